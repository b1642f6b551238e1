"""The collectives the code runs, for every dtype it communicates, checked for exact results on every rank; plus the
all-reduce bandwidth of the two training dtypes.

Which dtypes, and where: float32 (loss sums in training/step.py, fp32 gradient buffers, evaluation scores),
bfloat16 / float16 (tensor- and sequence-parallel activations, pipeline sends, distributed-optimizer parameters),
int32 (megatron-core's token counts, finalize_model_grads), int64 (generated token ids, inference/generation.py),
uint8 (all_gather_object of evaluation results, inference/session.py). Which ops: all-reduce, all-gather and
reduce-scatter (tensor / sequence / data parallelism), broadcast (generation, evaluation, token counts) and
point-to-point sends to the next rank (pipeline parallelism).
"""

from __future__ import annotations

import time
from typing import Dict, List

import torch
import torch.distributed as dist

DTYPES: Dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                                  "int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8}
N = 1024  # elements per rank in the exactness checks (small integers: exact in every dtype, no overflow at 8 ranks)


def _checks(dtype: torch.dtype, device, rank: int, world: int) -> Dict[str, bool]:
    def full(n, value):
        return torch.full((n,), value, dtype=dtype, device=device)

    def equal(t, expected):
        return bool(torch.equal(t.cpu(), expected.to(dtype).cpu()))

    ok = {}
    t = full(N, rank + 1)
    dist.all_reduce(t)
    ok["all_reduce"] = equal(t, torch.full((N,), world * (world + 1) // 2))

    out = torch.empty(world * N, dtype=dtype, device=device)
    dist.all_gather_into_tensor(out, full(N, rank))
    ok["all_gather"] = equal(out, torch.arange(world).repeat_interleave(N))

    chunks = torch.arange(world).repeat_interleave(N) + rank + 1  # chunk c on rank r holds r + 1 + c
    mine = torch.empty(N, dtype=dtype, device=device)
    dist.reduce_scatter_tensor(mine, chunks.to(dtype).to(device))
    ok["reduce_scatter"] = equal(mine, torch.full((N,), world * (world + 1) // 2 + world * rank))

    t = full(N, rank)
    dist.broadcast(t, src=world - 1)
    ok["broadcast"] = equal(t, torch.full((N,), world - 1))

    if world > 1:
        recv = torch.empty(N, dtype=dtype, device=device)
        ops = [dist.P2POp(dist.isend, full(N, rank), (rank + 1) % world),
               dist.P2POp(dist.irecv, recv, (rank - 1) % world)]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        ok["send_recv"] = equal(recv, torch.full((N,), (rank - 1) % world))
    return ok


def _sync(device) -> None:
    if device.type != "cpu":
        torch.cuda.synchronize()  # torch.npu's under transfer_to_npu


def _bandwidth(dtype: torch.dtype, device, world: int, size_mb: float, repeats: int = 5) -> dict:
    n = int(size_mb * 2 ** 20) // torch.empty(0, dtype=dtype).element_size()
    t = torch.ones(n, dtype=dtype, device=device)
    dist.all_reduce(t)  # warm-up (communicator set-up)
    _sync(device)
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(t)
        _sync(device)
        times.append(time.perf_counter() - t0)
    best = min(times)
    algbw = n * t.element_size() / best / 1e9
    return {"size_mb": size_mb, "seconds": best, "algbw_gb_s": algbw, "busbw_gb_s": algbw * 2 * (world - 1) / world}


def run(dev, size_mb: float = 64.0) -> dict:
    """This rank's results; every rank runs the same calls (torch.distributed and megatron-core are set up by the
    caller: ``aquila_npu.device.setup``)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    results: List[dict] = []
    for name, dtype in DTYPES.items():
        for op, good in _checks(dtype, dev.torch_device, rank, world).items():
            results.append({"op": op, "dtype": name, "ok": good})
    bandwidth = {name: _bandwidth(DTYPES[name], dev.torch_device, world, size_mb) for name in ("float32", "bfloat16")}
    failures = torch.tensor([sum(not r["ok"] for r in results)], dtype=torch.int64, device=dev.torch_device)
    dist.all_reduce(failures)
    return {"rank": rank, "world_size": world, "backend": dist.get_backend(), "results": results,
            "failures_all_ranks": int(failures.item()), "all_reduce_bandwidth": bandwidth}
