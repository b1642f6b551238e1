"""Measured memory of a training run against the planner's (``aquila_npu.planning``): the peak of what torch's
allocator handed out, on any device.

On the CPU torch's allocator keeps no statistics, but it reports every allocation and free to torch's profiler
(``profile_memory``): the running sum of those from the start of the run is the memory its tensors hold, and its
maximum the peak (what ``torch.cuda.max_memory_allocated`` is on a GPU). The profiler hears only the threads it
profiles (torch 2.13's ``profile_all_threads`` records no memory events at all): gloo's reduce-scatter and all-gather
copy their input into a temporary on the calling thread, and when gloo's worker thread drops the work object last,
that free goes unheard and the temporary stays counted (seen: one rank of a dp2 run a grad bucket above the other,
differently from run to run; the pipeline's sends and receives likewise, a few activation-sized tensors an
iteration). The error only ever adds, and a pipeline stage's ranks hold the same tensors, so
``compare`` takes the smallest peak of a stage's ranks (the largest is kept beside it).

``measure`` runs one rank of a run (``aquila_npu.pretrain``'s main, given by the caller) in this process under the
profiler and writes the rank's peak; ``compare`` sets the planner's stages beside the measured ranks.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Tuple

import torch

# The CPU runs the planner is checked against (tests/test_plan.py, benchmarks/plan_bench.py, docs/benchmark.md):
# name -> (processes, aquila_npu.pretrain flags besides RUN_FLAGS). Together they exercise every part of the memory
# model: pipeline stages with micro-batches in flight, sequence parallelism, full recomputation, bf16, the distributed
# optimizer, the real vocabulary's logits.
RUN_FLAGS = ["--mock-data", "--train-iters", "3", "--lr", "1e-4", "--seed", "7", "--device", "cpu"]
CPU_LAYOUTS = {
    "tiny-tp1": (1, ["--model", "aquila2-tiny", "--seq-length", "128", "--micro-batch-size", "4",
                     "--global-batch-size", "8"]),
    "small-tp1": (1, ["--model", "aquila2-small", "--seq-length", "256", "--micro-batch-size", "2",
                      "--global-batch-size", "2"]),
    "small-tp1-recompute": (1, ["--model", "aquila2-small", "--seq-length", "256", "--micro-batch-size", "4",
                                "--global-batch-size", "4", "--recompute-granularity", "full",
                                "--recompute-method", "uniform", "--recompute-num-layers", "1"]),
    "tiny-tp1-bf16": (1, ["--model", "aquila2-tiny", "--seq-length", "128", "--micro-batch-size", "4",
                          "--global-batch-size", "4", "--bf16"]),
    "small-tp2-sp": (2, ["--model", "aquila2-small", "--seq-length", "256", "--micro-batch-size", "2",
                         "--global-batch-size", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    # (the small model: the pipeline's sends and receives are gloo work objects too, and a few of their frees go
    # unheard every micro-batch; beside the tiny model's 3 MiB that was up to a third, beside the small one's 1%)
    "small-tp2-pp2": (4, ["--model", "aquila2-small", "--seq-length", "256", "--micro-batch-size", "1",
                          "--global-batch-size", "4", "--tensor-model-parallel-size", "2",
                          "--pipeline-model-parallel-size", "2"]),
    # (the small model too: the distributed optimizer's reduce-scatter and all-gather are gloo work objects; beside
    # the tiny model's 11 MiB an unheard free came to 10% in one CI run)
    "small-dp2-distopt": (2, ["--model", "aquila2-small", "--seq-length", "256", "--micro-batch-size", "2",
                              "--global-batch-size", "4", "--use-distributed-optimizer"]),
}


def peak_allocated(call: Callable[[], object]) -> Tuple[object, int]:
    """(call's result, the most bytes torch's allocator held at once while it ran; counted from the start)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = call()
        return result, torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = call()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return result, peak


def measure(call: Callable[[], int], out_dir: str) -> int:
    """One rank of a run (``call``: e.g. ``functools.partial(aquila_npu.cli.pretrain.main, argv)``) measured; writes
    ``<out_dir>/rank<R>.json`` (rank, world size, peak bytes, exit status) and returns the exit status. Picklable as
    ``functools.partial(measure, call, out_dir)`` for forked ranks."""
    rc, peak = peak_allocated(call)
    rank = int(os.environ.get("RANK", "0"))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world": int(os.environ.get("WORLD_SIZE", "1")), "peak_bytes": peak, "rc": rc}, f)
    return rc


def measured(out_dir: str) -> Dict[int, int]:
    """rank -> peak bytes of a measured run's ranks."""
    out = {}
    for name in os.listdir(out_dir):
        if name.startswith("rank") and name.endswith(".json"):
            with open(os.path.join(out_dir, name)) as f:
                r = json.load(f)
            out[r["rank"]] = r["peak_bytes"]
    return out


def compare(args, world: int, peaks: Dict[int, int], device: str = "cpu") -> List[dict]:
    """Per pipeline stage of the run of ``args`` (aquila_npu.pretrain's parsed flags) on ``world`` processes: the
    planner's allocated peak and the smallest measured peak of the stage's ranks (megatron-core's rank order: tensor
    parallel fastest, then data parallel, then pipeline)."""
    from aquila_npu.training.memory_plan import stages
    from aquila_npu.training.run import check

    _, _, cfg = check(args, world)
    plan = stages(args, cfg, device)
    per_stage = cfg.tp * cfg.data_parallel_size
    out = []
    for st in plan:
        ranks = [peaks[r] for r in peaks if r // per_stage == st.stage]
        got = min(ranks)  # (the module's docstring: a free on gloo's thread goes unheard; the error only adds)
        out.append({"stage": st.stage, "predicted_bytes": st.allocated, "measured_bytes": got,
                    "measured_max_bytes": max(ranks),
                    "error": st.allocated / got - 1, "parts": st.parts(), "in_flight": st.in_flight,
                    "micro_batch": st.micro_batch, "transient_what": st.transient_what})
    return out
