"""Self-check: our megatron-core Aquila2 model vs Hugging Face LLaMA, logits on the same tokens, on this device; with
``--report``, the first-hour report of a new node (``aquila_npu.checks``).

    python -m aquila_npu.selfcheck                                   # one process, auto-detected device
    torchrun --nproc-per-node 4 -m aquila_npu.selfcheck --tp 2 --pp 2
    torchrun --nproc-per-node 4 -m aquila_npu.selfcheck --tp 4 --device npu --dtype bf16   # fused Ascend kernels
    python -m aquila_npu.selfcheck --device npu --out report.json   # on an NPU node: every check, all devices
    python -m aquila_npu.selfcheck --compare npu-stats.jsonl cpu-stats.jsonl   # where two runs' losses part

Every rank builds the same tiny random model (registry ``aquila2-tiny-gqa``, seeded weights: aquila_npu.checks.logits),
loads its stage through the weight-mapping table, and the last pipeline stage (TP rank 0) prints the max |ours - HF|
(and writes it to --out when given); exit status 1 when it is out of tolerance.

``--report`` (run it without torchrun: it starts its own processes) checks each fused op against the plain path
(forward and backward, bf16 and fp16), the collectives for every dtype the code communicates, these logits, a tiny
training run over all devices against a CPU reference shipped with the package, save and resume, and a short
throughput benchmark; it prints one report and writes it to --out as JSON. Exit status 1 when a check failed.

``--compare RUN_A RUN_B`` reads two runs' per-layer statistics (``aquila_npu.pretrain --layer-stats FILE``) and names
the first iteration and layer where they part beyond the dtype's tolerance (aquila_npu.checks.drift).
"""

import argparse
import sys

from aquila_npu.checks.report import CHECKS
from aquila_npu.cli.common import Parser, add_device_argument, run_cli
from aquila_npu.errors import UsageError
from aquila_npu.outputs.files import check_target

PROG = "python -m aquila_npu.selfcheck"
DTYPE_FLAGS = ("fp32", "bf16", "fp16")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="Compare our model's logits with Hugging Face transformers on this device; "
                                      "or, with --report, check this node (every device).")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    add_device_argument(p)
    p.add_argument("--dtype", default=None, choices=DTYPE_FLAGS,
                   help="parameter dtype (default fp32; with --report bf16 on npu / cuda, fp32 on cpu)")
    p.add_argument("--load", default=None,
                   help="a Megatron checkpoint directory (from convert_ckpt.py) to check instead of a random model; "
                        "its tp/pp must match --tp/--pp; needs --hf-dir")
    p.add_argument("--hf-dir", default=None, help="the Hugging Face model the --load checkpoint was converted from")
    p.add_argument("--out", default=None, help="write the result (or the report) as JSON to this file")
    g = p.add_argument_group("the first-hour report (--report)")
    g.add_argument("--report", action="store_true",
                   help="run every check on this node and print one report (start it without torchrun); the default "
                        "on an Ascend NPU node when started without torchrun and without --load")
    g.add_argument("--logits-only", action="store_true", help="only the logits check, also on an NPU node")
    g.add_argument("--checks", default=",".join(CHECKS),
                   help=f"which checks, comma-separated (default all: {','.join(CHECKS)})")
    g.add_argument("--nproc", type=int, default=None,
                   help="devices to use (default: every device of this node; 1 on cpu)")
    g.add_argument("--workdir", default=None,
                   help="keep every check's logs here (default: a temporary folder, kept only when a check fails)")
    g.add_argument("--timeout", type=float, default=1800, help="seconds allowed per check process (default 1800)")
    g.add_argument("--comm-size-mb", type=float, default=64.0,
                   help="message size of the all-reduce bandwidth measurement (default 64 MiB)")
    g = p.add_argument_group("loss drift, located (--compare)")
    g.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), default=None,
                   help="compare two runs' per-layer statistics (aquila_npu.pretrain --layer-stats FILE: the same "
                        "checkpoint, data and flags on two devices, dtypes or layouts) and name the first iteration "
                        "and layer where they part beyond the dtype's tolerance; exit status 1 when they part")
    g.add_argument("--tolerance", type=float, default=None,
                   help="relative tolerance of --compare (default by the less precise dtype: fp32 1e-4, fp16 5e-3, "
                        "bf16 2e-2)")
    return p


def parse(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.report and args.logits_only:
        raise UsageError("--report and --logits-only exclude each other")
    if args.compare and (args.report or args.logits_only or args.load):
        raise UsageError("--compare reads two --layer-stats files: it runs no other check")
    if args.tolerance is not None and not (args.compare and args.tolerance > 0):
        raise UsageError(f"--tolerance {args.tolerance}: a relative tolerance > 0 for --compare")
    if args.out:
        check_target("--out", args.out)
    return args


def main(argv=None) -> int:
    return run_cli(PROG, parse, "aquila_npu.jobs.selfcheck:run", argv)


if __name__ == "__main__":
    sys.exit(main())
