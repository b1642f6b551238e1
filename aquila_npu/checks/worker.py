"""One check in this process (a child of ``aquila_npu.checks.report``; ``torchrun`` for the collectives):

    python -m aquila_npu.checks.worker ops --device npu --out ops.json
    torchrun --nproc-per-node 8 -m aquila_npu.checks.worker collectives --device npu --out coll.json

Each rank writes ``<out>.rank<R>`` (rank 0 also ``<out>``) as JSON.
"""

from __future__ import annotations

import argparse
import sys

import torch

from aquila_npu.outputs.files import write_json


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m aquila_npu.checks.worker")
    p.add_argument("check", choices=["ops", "collectives"])
    p.add_argument("--device", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--size-mb", type=float, default=64.0, help="all-reduce bandwidth message size")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from aquila_npu.device.backends import FusedOps
    from aquila_npu.device.setup import setup
    from aquila_npu.parallel import destroy_model_parallel, initialize_model_parallel

    dev = setup(a.device, FusedOps.all() if a.check == "ops" else FusedOps())
    try:
        if a.check == "ops":
            from aquila_npu.checks import ops

            initialize_model_parallel(1, 1)
            result = {"results": ops.run(dev)}
        else:
            from aquila_npu.checks import collectives

            result = collectives.run(dev, a.size_mb)
        rank = torch.distributed.get_rank()
        for path in [f"{a.out}.rank{rank}"] + ([a.out] if rank == 0 else []):
            write_json(path, result, f"the {a.check} check's result")
    finally:
        destroy_model_parallel()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
