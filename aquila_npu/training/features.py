"""Which training-speed features a run has on, as the run itself sees them: written once to the --metrics-file (a
``{"run_features": {...}}`` line) and so recorded by the benchmark beside its figures."""

from __future__ import annotations

from aquila_npu.compat.megatron_core import l2_norm_on_device
from aquila_npu.device.torch_modules import CoreAttentionBase
from aquila_npu.flops import DevicePeak


def _grad_norm_kernel() -> str:
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads

    if clip_grads.l2_norm_impl is l2_norm_on_device:
        return "on the device (aquila_npu.compat.megatron_core.l2_norm_on_device)"
    if clip_grads.l2_norm_impl is mcore_utils.local_multi_tensor_l2_norm:
        return "megatron-core's fallback (one host sync per gradient tensor)"
    return "Transformer Engine / Apex multi-tensor kernel"


def run_features(model, peak: DevicePeak) -> dict:
    """``model``: the megatron-core DistributedDataParallel model stage as built (its config is the one in use)."""
    ddp = model.ddp_config
    attention = sorted({type(m) for m in model.modules() if isinstance(m, CoreAttentionBase)}, key=str)
    return {
        "use_distributed_optimizer": ddp.use_distributed_optimizer,
        "overlap_grad_reduce": ddp.overlap_grad_reduce,
        "overlap_param_gather": ddp.overlap_param_gather,
        "ddp_bucket_size": ddp.bucket_size,  # None: one bucket (no overlap)
        "grad_reduce_in_fp32": ddp.grad_reduce_in_fp32,
        "core_attention": [cls.__name__ for cls in attention],
        "causal_mask": sorted({"one shared [S, S] mask per (S, device)" if cls.needs_causal_mask
                               else "its own causal mode (no [S, S] mask per layer)" for cls in attention}),
        "attention_rng_fork": "only with attention dropout > 0",
        "grad_norm": _grad_norm_kernel(),
        "device_peak_tflops": peak.tflops,
        "device_peak_source": peak.source,
    }
