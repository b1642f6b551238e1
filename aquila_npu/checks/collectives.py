"""The collectives the code runs, for every dtype it communicates them in, checked for exact results on every rank;
plus the all-reduce bandwidth of the two training dtypes.

``USES``: dtype -> the collectives that carry it, and where.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List

import torch
import torch.distributed as dist

USES: Dict[str, tuple] = {
    # losses (training/step.py), fp32 gradient buffers (DDP, grad_reduce_in_fp32), distributed-optimizer and
    # tensor/sequence-parallel traffic and pipeline sends of fp32 runs
    "float32": ("all_reduce", "all_gather", "reduce_scatter", "send_recv"),
    # the same traffic in bf16 / fp16 runs
    "bfloat16": ("all_reduce", "all_gather", "reduce_scatter", "send_recv"),
    "float16": ("all_reduce", "all_gather", "reduce_scatter", "send_recv"),
    "float64": ("broadcast",),  # evaluation scores to the other pipeline stages (evaluation/scoring.py)
    "int32": ("all_reduce", "broadcast"),  # megatron-core's token counts (finalize_model_grads)
    "int64": ("broadcast", "all_gather"),  # generated token ids (inference/generation.py); all_gather_object sizes
    "uint8": ("all_gather",),  # all_gather_object payloads (evaluation results, inference/session.py)
}
N = 1024  # elements per rank (small integers: exact in every dtype, no overflow at 8 ranks)


def _ops(dtype: torch.dtype, device, rank: int, world: int) -> Dict[str, Callable[[], bool]]:
    """Each collective as a function returning whether this rank got the exact expected result."""

    def full(n, value):
        return torch.full((n,), value, dtype=dtype, device=device)

    def equal(t, expected):
        return bool(torch.equal(t.cpu(), expected.to(dtype)))

    def all_reduce():
        t = full(N, rank + 1)
        dist.all_reduce(t)
        return equal(t, torch.full((N,), world * (world + 1) // 2))

    def all_gather():
        out = torch.empty(world * N, dtype=dtype, device=device)
        dist.all_gather_into_tensor(out, full(N, rank))
        return equal(out, torch.arange(world).repeat_interleave(N))

    def reduce_scatter():
        chunks = torch.arange(world).repeat_interleave(N) + rank + 1  # chunk c on rank r holds r + 1 + c
        mine = torch.empty(N, dtype=dtype, device=device)
        dist.reduce_scatter_tensor(mine, chunks.to(dtype).to(device))
        return equal(mine, torch.full((N,), world * (world + 1) // 2 + world * rank))

    def broadcast():
        t = full(N, rank)
        dist.broadcast(t, src=world - 1)
        return equal(t, torch.full((N,), world - 1))

    def send_recv():  # to the next rank, from the previous one (a pipeline's step)
        if world == 1:
            return True
        recv = torch.empty(N, dtype=dtype, device=device)
        ops = [dist.P2POp(dist.isend, full(N, rank), (rank + 1) % world),
               dist.P2POp(dist.irecv, recv, (rank - 1) % world)]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        return equal(recv, torch.full((N,), (rank - 1) % world))

    return {"all_reduce": all_reduce, "all_gather": all_gather, "reduce_scatter": reduce_scatter,
            "broadcast": broadcast, "send_recv": send_recv}


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
    for name, ops in USES.items():
        calls = _ops(getattr(torch, name), dev.torch_device, rank, world)
        for op in ops:
            try:
                results.append({"op": op, "dtype": name, "ok": calls[op]()})
            except Exception as e:  # noqa: BLE001 - an unsupported dtype is a result (every rank raises alike)
                results.append({"op": op, "dtype": name, "ok": False, "error": f"{type(e).__name__}: {e}"})
    bandwidth = {name: _bandwidth(getattr(torch, name), dev.torch_device, world, size_mb)
                 for name in ("float32", "bfloat16")}
    failures = torch.tensor([sum(not r["ok"] for r in results)], dtype=torch.float32, device=dev.torch_device)
    dist.all_reduce(failures)
    return {"rank": rank, "world_size": world, "backend": dist.get_backend(), "results": results,
            "failures_all_ranks": int(failures.item()), "all_reduce_bandwidth": bandwidth}
