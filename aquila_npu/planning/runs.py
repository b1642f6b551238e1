"""The planner's view of one ``aquila_npu.pretrain`` run: its workload and layout from the parsed flags and the
resolved model, and the one start-up line saying what the plan expects per device and whether it fits."""

from __future__ import annotations

import functools
from typing import List, Optional, Tuple

from aquila_npu.device.fused import FusedOps
from aquila_npu.models.registry import ModelSpec
from aquila_npu.planning.devices import GIB
from aquila_npu.planning.memory import Parallel, StageMemory, Workload, worst


def from_flags(args, spec: ModelSpec, *, data_parallel_size: int, seq_length: int, global_batch_size: int,
               make_vocab_size_divisible_by: int, device: str) -> Tuple[Workload, Parallel]:
    """(workload, layout) of a run with pretrain's parsed flags on ``device`` (npu / cuda / cpu)."""
    dtype = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    fused = FusedOps.from_args(args)
    kernels = frozenset(k for k in FusedOps.KERNELS if getattr(fused, k)) if device == "npu" else frozenset()
    work = Workload(spec=spec, seq_length=seq_length, global_batch_size=global_batch_size, dtype=dtype,
                    make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                    grads_in_fp32=bool(args.accumulate_allreduce_grads_in_fp32), fused=kernels,
                    fused_adam=device in ("npu", "cuda"),
                    attention_probabilities=device in ("cpu", "cuda") and sdpa_keeps_probabilities(
                        device, dtype, spec.num_attention_heads, spec.num_key_value_heads))
    recompute = args.recompute_granularity or "none"
    par = Parallel(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size, dp=data_parallel_size,
                   micro_batch_size=args.micro_batch_size, sequence_parallel=bool(args.sequence_parallel),
                   recompute=recompute, distributed_optimizer=bool(args.use_distributed_optimizer),
                   recompute_method=args.recompute_method or "uniform",
                   recompute_num_layers=args.recompute_num_layers or 1)
    return work, par


@functools.lru_cache(maxsize=None)
def sdpa_keeps_probabilities(device: str, dtype: str, heads: int, groups: int) -> bool:
    """Whether the installed torch's SDPA (the plain attention, device/torch_modules.py) runs its math kernel on
    ``device`` for this head / group ratio: found by asking torch once (the backward node of a tiny call), since it
    changes between releases (torch 2.6's CPU flash kernel has no GQA and falls back to math; 2.13's has it)."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    try:
        q = torch.zeros(1, heads, 16, 8, dtype=dt, device=device, requires_grad=True)
        kv = torch.zeros(1, groups, 16, 8, dtype=dt, device=device, requires_grad=True)
        out = torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=heads != groups)
    except Exception:  # (a device or dtype SDPA refuses here: the run itself will say so)
        return False
    name = type(out.grad_fn).__name__
    return "ScaledDotProduct" not in name  # flash / efficient / cuDNN kernels name their backward; math does not


def start_line(stages: List[StageMemory], capacity: Optional[int], device_label: str) -> Tuple[str, Optional[bool]]:
    """(the line, whether it fits: None without a capacity)."""
    st = worst(stages)
    parts = (f"weights {st.weights / GIB:.2f}, gradients {st.gradients / GIB:.2f}, optimizer "
             f"{st.optimizer / GIB:.2f}, activations {st.activations / GIB:.2f} ({st.in_flight} micro-batch"
             f"{'es' if st.in_flight > 1 else ''} in flight), {st.transient_what} {st.transient / GIB:.2f}")
    if st.comm_buffers or st.reserve:
        parts += f", communication buffers {st.comm_buffers / GIB:.2f}, runtime reserve {st.reserve / GIB:.2f}"
    line = f"memory plan: {st.peak / GIB:.2f} GiB per device on pipeline stage {st.stage} ({parts} GiB)"
    if capacity is None:
        return line + f" ({device_label}: no device limit)", None
    fits = st.peak <= capacity
    return line + f" of {capacity / GIB:.1f} GiB on {device_label}", fits
