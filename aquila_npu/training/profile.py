"""``--profile-breakdown FILE``: where one training iteration's time goes, from ``torch.profiler``.

Every operator the step runs is put in one group by its name, the names of the operators and ranges around it, and
its input shapes:

* ``optimizer``: inside ``optimizer.step()`` (marked ``aquila:optimizer`` by ``training.step``): main-gradient
  copies, gradient norm and clipping, Adam, parameter copies;
* ``output_and_loss``: the output layer and the cross-entropy: an operator with the (padded) vocabulary as a
  dimension of an input, or inside the chunked loss (``aquila:loss``);
* ``attention``: SDPA / flash / efficient / cuDNN attention, forward and backward;
* ``gemm``: the other matrix products (QKV, O, the MLP's gate/up/down), forward and backward;
* ``elementwise``: every other operator of forward and backward (RMSNorm, RoPE, SwiGLU, residual adds, casts,
  copies of activations);
* ``other``: embedding, gradient accumulation into megatron-core's buffers, collectives;
* ``host_gaps``: the iteration's wall time that no operator covers (Python, launches, waits): on a GPU the time the
  device is idle, on the CPU the time outside operators.

Time of an operator: on CUDA the duration of the kernels it launched (torch.profiler links them); on the CPU its own
time (children excluded). The profiled iteration runs under the profiler's overhead: compare the shares, not its
wall time, with the benchmark's step times.
"""

from __future__ import annotations

import json
import time
from typing import Dict, Iterable, List, Optional

import torch

GROUPS = ("gemm", "attention", "elementwise", "output_and_loss", "optimizer", "other", "host_gaps")
LABELS = {"gemm": "GEMMs (QKV, O, MLP)", "attention": "attention", "elementwise":
          "elementwise (norms, RoPE, SwiGLU, residual adds, casts)", "output_and_loss":
          "output layer + cross-entropy", "optimizer": "optimizer step (incl. grad norm)",
          "other": "other (embedding, grad accumulation, collectives)", "host_gaps": "host gaps (no operator running)",
          "unattributed_kernels": "device kernels of no operator"}
ATTENTION = ("scaled_dot_product", "scaleddotproduct", "flash_attention", "efficient_attention", "cudnn_attention",
             "fmha", "flash_fwd", "flash_bwd", "flashattention")
OTHER = ("embedding", "accumulategrad", "c10d", "nccl", "gloo", "allreduce", "all_reduce", "reduce_scatter",
         "all_gather")
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
            "aten::_addmm_activation", "aten::addbmm"}


def _names(evt) -> List[str]:
    out = []
    while evt is not None:
        out.append(evt.name.lower())
        evt = evt.cpu_parent
    return out


def _has_dim(shapes, dim: int) -> bool:
    for s in shapes or ():
        if isinstance(s, (list, tuple)) and s and (dim in s or _has_dim(s, dim)):
            return True
    return False


def classify(names: List[str], shapes, vocab: Optional[int]) -> str:
    """The group of an operator: ``names`` its own name then its enclosing ranges' (innermost first)."""
    if any("aquila:optimizer" in n or n.startswith("optimizer.step") for n in names):
        return "optimizer"
    if any("aquila:loss" in n for n in names):
        return "output_and_loss"
    if any(k in n for n in names for k in ATTENTION):
        return "attention"
    if any(k in n for n in names for k in OTHER):
        return "other"
    if vocab and _has_dim(shapes, vocab):
        return "output_and_loss"
    if names[0] in GEMM_OPS or any(k in names[0] for k in ("gemm", "cutlass", "nvjet", "xmma")):
        return "gemm"
    return "elementwise"


def _is_operator(name: str) -> bool:
    return name.startswith(("aten::", "c10d::", "_c10d", "gloo:", "nccl:"))


def summarize(events: Iterable, wall_s: float, vocab: Optional[int], on_device: bool) -> Dict[str, float]:
    """Seconds per group (``GROUPS``; plus ``unattributed_kernels`` on a device) of one profiled iteration."""
    from torch.autograd import DeviceType

    out = {g: 0.0 for g in GROUPS}
    attributed = busy = 0.0
    for evt in events:
        if on_device:
            if evt.device_type != DeviceType.CPU:
                busy += (evt.time_range.end - evt.time_range.start) / 1e6
                continue
            spent = sum(k.duration for k in evt.kernels) / 1e6
        else:
            if evt.device_type != DeviceType.CPU or not _is_operator(evt.name):
                continue
            spent = evt.self_cpu_time_total / 1e6
        if spent > 0:
            out[classify(_names(evt), evt.input_shapes, vocab)] += spent
            attributed += spent
    if on_device:
        out["unattributed_kernels"] = max(busy - attributed, 0.0)
        out["host_gaps"] = max(wall_s - busy, 0.0)
    else:
        out["host_gaps"] = max(wall_s - attributed, 0.0)
    return out


class StepProfile:
    """Profiles iteration ``iteration`` of the loop (``begin`` / ``end`` around the step) and writes the groups to
    ``path`` as JSON (on the writing rank: the last, which holds the output layer)."""

    def __init__(self, path: str, iteration: int, device: str, vocab: int, flops: Dict[str, float],
                 tokens_per_step: int, is_writer: bool, meta: Optional[dict] = None):
        self.path, self.iteration, self.device, self.vocab = path, iteration, device, vocab
        self.flops, self.tokens, self.is_writer, self.meta = flops, tokens_per_step, is_writer, meta or {}
        self.prof, self.t0 = None, 0.0

    def begin(self, iteration: int) -> None:
        if iteration != self.iteration:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        self.prof = torch.profiler.profile(activities=activities, record_shapes=True)
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def end(self, iteration: int) -> None:
        if iteration != self.iteration or self.prof is None:
            return
        if self.device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        groups = summarize(self.prof.events(), wall, self.vocab, self.device == "cuda")
        self.prof = None
        if self.is_writer:
            write(self.path, report(groups, wall, self.flops, self.tokens, self.device, self.iteration, self.meta))


def report(groups: Dict[str, float], wall_s: float, flops: Dict[str, float], tokens_per_step: int, device: str,
           iteration: int, meta: dict) -> dict:
    """The JSON of a profile: seconds and shares per group, and the model TFLOP/s of the groups whose FLOPs are
    counted (``aquila_npu.flops.training_flops_breakdown``: per token, times the tokens of the step)."""
    total = sum(groups.values()) or 1.0
    rates = {g: flops[g] * tokens_per_step / groups[g] / 1e12 for g in flops if groups.get(g)}
    return {"schema": "aquila_npu.step_profile/1", "device": device, "iteration": iteration, "wall_s": wall_s,
            "seconds": groups, "shares": {g: t / total for g, t in groups.items()},
            "tflops": rates, "labels": {g: LABELS[g] for g in groups}, **meta}


def write(path: str, doc: dict) -> None:
    from aquila_npu.outputs.files import write_json

    write_json(path, doc, "the step profile", indent=1)


def table(doc: dict) -> str:
    """The profile as text rows: group, ms, share, model TFLOP/s where counted."""
    rows = [f"where iteration {doc['iteration']}'s time goes ({doc['device']}, profiled; wall "
            f"{doc['wall_s'] * 1e3:.1f} ms under the profiler):"]
    for g, t in doc["seconds"].items():
        rate = doc.get("tflops", {}).get(g)
        rows.append(f"  {doc['labels'].get(g, g):<58} {t * 1e3:10.1f} ms {doc['shares'][g]:6.1%}"
                    + (f"  {rate:8.2f} model TFLOP/s" if rate else ""))
    return "\n".join(rows)


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
