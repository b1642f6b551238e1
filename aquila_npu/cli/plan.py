"""``python -m aquila_npu.plan`` (also ``aquila-plan``): the training layouts of a model on N devices that fit their
memory, best throughput estimate first, with the memory of each part, and why the others do not fit. Before the
first run, not after the first out-of-memory.

    python -m aquila_npu.plan --model aquila2-7b --device 910B2 --nproc-per-node 8 \\
        --seq-length 2048 --global-batch-size 64 --micro-batch-size 8 --fp16       # ModelLink's 7B settings
    python -m aquila_npu.plan --model aquila2-34b --device 910B2 --nproc-per-node 8 --nnodes 2 \\
        --seq-length 4096 --global-batch-size 1024 --micro-batch-size 2 --bf16     # ModelLink's 34B settings
    python -m aquila_npu.plan --load ./model_weights/Aquila2-7B-v0.1-tp8-pp1/ --device-memory-gb 30 ...

The memory model (docs/benchmark.md, "Memory plan") comes from the model's shapes and megatron-core's schedule and
is checked against measured peaks; the throughput estimate only ranks layouts against each other. Fixing --tp, --pp,
--micro-batch-size, --sequence-parallel, --recompute or --use-distributed-optimizer narrows the search to them.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from aquila_npu.cli.common import Parser, run_cli
from aquila_npu.errors import UsageError
from aquila_npu.flags import check_positive
from aquila_npu.models.registry import MODELS
from aquila_npu.planning.devices import DEVICES

PROG = "python -m aquila_npu.plan"


def parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
               description=__doc__.split("\n\n")[0], epilog="examples:\n" + __doc__.split("\n\n", 1)[1])
    g = p.add_argument_group("model and batch")
    g.add_argument("--model", default=None, help=f"a registry model ({', '.join(sorted(MODELS))})")
    g.add_argument("--load", default=None,
                   help="a converted Megatron checkpoint (its architecture and vocabulary padding), or a Hugging Face "
                        "folder (config.json), instead of --model")
    g.add_argument("--num-layers", type=int, default=None, help="the model with this many layers (its width kept)")
    g.add_argument("--seq-length", type=int, default=None, help="tokens per sample (default: the model's positions)")
    g.add_argument("--global-batch-size", type=int, required=False, default=None, help="samples per iteration")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="samples per micro-batch (default: every divisor of the batch per data-parallel rank)")
    g.add_argument("--bf16", action="store_true", help="bf16 training (the default)")
    g.add_argument("--fp16", action="store_true", help="fp16 training")
    g.add_argument("--fp32", action="store_true", help="fp32 training")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=1)
    g.add_argument("--no-accumulate-allreduce-grads-in-fp32", action="store_true",
                   help="gradients in the training dtype (pretrain's flag; default fp32 gradients)")
    g = p.add_argument_group("devices")
    g.add_argument("--device", default=None,
                   help=f"the accelerator: {', '.join(DEVICES)} (torch's names work too: Ascend910B2, "
                        "'NVIDIA H100 80GB HBM3'); another needs --device-memory-gb")
    g.add_argument("--device-memory-gb", type=float, default=None,
                   help="GiB one process can allocate on a device (overrides the table's)")
    g.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=8, help="devices per node (default 8)")
    g.add_argument("--nnodes", type=int, default=1, help="nodes (default 1)")
    g.add_argument("--reserve-gb", type=float, default=None,
                   help="GiB kept back for the runtime's workspace and fragmentation (default 3%% of the device, at "
                        "least 1)")
    g.add_argument("--device-peak-tflops", type=float, default=None,
                   help="dense bf16/fp16 TFLOP/s of one device for the throughput estimate (default: aquila_npu.flops)")
    g.add_argument("--no-fused", action="store_true",
                   help="plan the plain PyTorch modules (default on an NPU: the fused Ascend kernels the example "
                        "scripts switch on)")
    g = p.add_argument_group("narrowing the search (default: every choice)")
    g.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=None)
    g.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=None)
    g.add_argument("--sequence-parallel", default=None, action=argparse.BooleanOptionalAction)
    g.add_argument("--recompute", default=None, choices=["none", "selective", "full"])
    g.add_argument("--use-distributed-optimizer", default=None, action=argparse.BooleanOptionalAction)
    g = p.add_argument_group("output")
    g.add_argument("--top", type=int, default=10, help="layouts listed (default 10)")
    g.add_argument("--json", default=None, metavar="FILE", help="also write every layout's figures to FILE")
    return p


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    args = parser().parse_args(argv)
    if bool(args.model) == bool(args.load):
        raise UsageError("give --model (a registry name) or --load (a checkpoint), one of them")
    if args.model and args.model.lower() not in MODELS:
        raise UsageError(f"--model {args.model}: unknown; known: {', '.join(sorted(MODELS))}")
    if sum((args.bf16, args.fp16, args.fp32)) > 1:
        raise UsageError("--bf16, --fp16 and --fp32 exclude each other")
    if args.global_batch_size is None:
        raise UsageError("--global-batch-size is required (samples per iteration)")
    check_positive(args, "global_batch_size", "micro_batch_size", "seq_length", "num_layers", "nproc_per_node",
                   "nnodes", "tp", "pp", "top", "make_vocab_size_divisible_by")
    for flag in ("device_memory_gb", "device_peak_tflops"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            raise UsageError(f"--{flag.replace('_', '-')} {value} must be > 0")
    if args.reserve_gb is not None and args.reserve_gb < 0:
        raise UsageError(f"--reserve-gb {args.reserve_gb} must be >= 0")
    from aquila_npu.planning.devices import lookup

    if args.device is None and args.device_memory_gb is None:
        raise UsageError(f"give --device ({', '.join(DEVICES)}) or --device-memory-gb")
    if args.device is not None and lookup(args.device) is None and args.device_memory_gb is None:
        raise UsageError(f"--device {args.device}: unknown; known: {', '.join(DEVICES)}; for another device give "
                         "--device-memory-gb (and --device-peak-tflops for the throughput estimate)")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(PROG, parse, "aquila_npu.jobs.plan:run", argv, requires=("torch",))


if __name__ == "__main__":
    sys.exit(main())
