"""The planner's view of one ``aquila_npu.pretrain`` run: its workload and layout from the parsed flags and the
resolved model, and the one start-up line saying what the plan expects per device and whether it fits."""

from __future__ import annotations

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
                    fused_adam=device in ("npu", "cuda"))
    recompute = args.recompute_granularity or "none"
    par = Parallel(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size, dp=data_parallel_size,
                   micro_batch_size=args.micro_batch_size, sequence_parallel=bool(args.sequence_parallel),
                   recompute=recompute, distributed_optimizer=bool(args.use_distributed_optimizer),
                   recompute_method=args.recompute_method or "uniform",
                   recompute_num_layers=args.recompute_num_layers or 1)
    return work, par


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
