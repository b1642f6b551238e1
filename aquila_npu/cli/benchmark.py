"""Training throughput benchmark: tokens/s and model TFLOP/s per device, s/step, MFU and peak memory.

    python -m aquila_npu.benchmark --model aquila2-tiny --iters 5                  # CPU smoke test
    python -m aquila_npu.benchmark --model aquila2-7b --num-layers 4 --seq-length 4096 --dtype bf16 \\
        --micro-batch-size 1 --global-batch-size 8 --fused both                   # one GPU / NPU
    python -m aquila_npu.benchmark --model aquila2-7b --tp 8 --nproc 8 --global-batch-size 64 --dtype fp16 \\
        --micro-batch-size 8 --seq-length 2048 --fused on -- --sequence-parallel   # ModelLink's 7B layout
    python -m aquila_npu.benchmark --compare npu.json gpu.json [--plot cmp.png]

Runs ``aquila_npu.pretrain`` on random tokens (``--mock-data``) for ``--warmup`` + ``--iters`` iterations on the
device present, drops the warm-up iterations and reports the median step time and what follows from it; writes a JSON
result. ``--compare`` prints saved results side by side. Flags after ``--`` go to aquila_npu.pretrain unchanged.
Details, the FLOP formula and the peak table: docs/benchmark.md.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from aquila_npu.benchmarking.switches import SWITCHES
from aquila_npu.cli.common import Parser, add_device_argument, run_cli
from aquila_npu.device.fused import FusedOps
from aquila_npu.errors import UsageError
from aquila_npu.models.registry import MODELS

PROG = "python -m aquila_npu.benchmark"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=f"{PROG} [options] [-- aquila_npu.pretrain flags]  |  {PROG} --compare A.json B.json ... [--plot P]",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n", 2)[2],
        epilog="examples:\n" + __doc__.split("\n\n")[1])
    g = p.add_argument_group("model and batch")
    g.add_argument("--model", default="aquila2-tiny",
                   help=f"registry architecture (default aquila2-tiny; known: {', '.join(sorted(MODELS))})")
    g.add_argument("--num-layers", type=int, default=None,
                   help="layers (default: the model's); the width stays the model's, e.g. aquila2-7b with 4 layers")
    g.add_argument("--seq-length", type=int, default=None,
                   help="tokens per sample (default: the model's max positions; longer raises them, RoPE)")
    g.add_argument("--micro-batch-size", type=int, default=1, help="samples per micro-batch (default 1)")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="samples per iteration (default micro batch x data-parallel size)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="training precision (default auto: bf16 on npu/cuda, fp32 on cpu)")
    g = p.add_argument_group("device and parallelism")
    add_device_argument(g)
    g.add_argument("--nproc", type=int, default=None,
                   help="processes = devices (default tp x pp; more adds data parallelism; > 1 launches torchrun)")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    g.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    g.add_argument("--fused", default="off", choices=["off", "on", "both"],
                   help="fused kernels: off (plain PyTorch modules, default), on (the fused switches), both (both "
                        "runs back to back and their throughput ratio; on a device without fused kernels, e.g. "
                        "cpu, the unfused run only, saying why; with more than one data-parallel rank also the "
                        "plain run with --overlap-grad-reduce (and --overlap-param-gather with the distributed "
                        "optimizer) toggled, and the overlap on / off ratio)")
    g.add_argument("--fused-switches", default=",".join(n.replace("_", "-") for n in FusedOps.KERNELS),
                   help="which switches the fused run turns on, comma-separated from "
                        + ", ".join(f"{short} ({FusedOps.SWITCHES[name][0]})" for short, name in SWITCHES.items())
                        + "; default every kernel (mc2 also needs --sequence-parallel after --)")
    g.add_argument("--device-peak-tflops", type=float, default=None,
                   help="peak dense bf16/fp16 TFLOP/s of one device for MFU (default: aquila_npu.flops's table, by the "
                        "device name torch reports: Ascend 910A/910B1-B4/910C (Ascend910_93xx), NVIDIA A100/H100/"
                        "H200; docs/benchmark.md lists it with sources; none for CPU; an unknown device has no MFU "
                        "until this is given)")
    g = p.add_argument_group("measurement and output")
    g.add_argument("--warmup", type=int, default=3, help="iterations run first and not measured (default 3)")
    g.add_argument("--iters", type=int, default=10, help="measured iterations (default 10)")
    g.add_argument("--output", default=None,
                   help="JSON result path (default benchmarks/results/<device>-<model>-seq<S>-<time>.json under "
                        "the current directory)")
    g.add_argument("--label", default=None,
                   help="device name in tables (default the device's own, e.g. 'NVIDIA H100 80GB HBM3'; a CPU "
                        "label always says CPU)")
    g.add_argument("--log-dir", default=None,
                   help="keep the training logs and metrics files here (default: a temporary directory, kept "
                        "only when a run fails)")
    g.add_argument("--timeout", type=float, default=None, help="seconds allowed per training run (default none)")
    g.add_argument("--profile", action="store_true",
                   help="profile each run's last warm-up iteration with torch.profiler and print where its "
                        "time goes (GEMMs, attention, elementwise, output layer + cross-entropy, optimizer, host "
                        "gaps); cuda and cpu")
    g = p.add_argument_group("comparing saved results")
    g.add_argument("--compare", nargs="+", metavar="RESULT.json", default=None,
                   help="print these results side by side (tokens/p/s relative to the first) instead of running")
    g.add_argument("--plot", default=None, metavar="PNG",
                   help="also write a bar chart of the results (this run's, or the --compare files') to PNG "
                        "(needs matplotlib)")
    return p


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The flags, and those after ``--`` (for aquila_npu.pretrain) as ``pretrain_flags``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = build_parser().parse_args(argv)
    if args.compare and extra:
        raise UsageError("flags after -- are for a run, not for --compare")
    args.pretrain_flags = extra
    return args


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(PROG, parse, "aquila_npu.benchmarking.command:run", argv)


if __name__ == "__main__":
    sys.exit(main())
