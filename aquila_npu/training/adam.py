"""The Adam implementation of a training run, chosen for the device instead of found by import.

megatron-core 0.16.1 picks its Adam when ``megatron.core.optimizer`` is imported: Transformer Engine's FusedAdam, else
Apex's FusedAdam, else ``torch.optim.AdamW``. An Apex built without its CUDA extensions (common on Ascend nodes, where
it is installed for other tools) imports fine and then raises in FusedAdam's constructor, so the run died before its
first step. We always use torch's AdamW, with the implementation each device has a kernel for:

* ``npu``: ``torch.optim.AdamW(fused=True)``. torch's fused AdamW calls the ``_fused_adamw_`` operator, which torch_npu
  registers for NPU tensors in every supported release (``torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml``:
  2.6.0 line 1102, 2.13.0 line 1470), and torch's ``fused=True`` device check admits the PrivateUse1 backend that
  torch_npu names ``npu`` (``torch/utils/_foreach_utils.py: _get_fused_kernels_supported_devices``, in torch 2.6.0
  and 2.13.0). MindSpeed's own AdamW calls the same ``torch._fused_adamw_``. torch_npu registers no
  ``_fused_adamw_.tensor_lr`` overload, so the learning rate must stay a Python float (megatron-core's scheduler sets
  floats). Not chosen: ``torch_npu.npu_apply_adam_w`` (one call per tensor, takes beta^(t-1) and would need an
  optimizer class written by hand, with its own state layout) and ``torch_npu.optim.NpuFusedAdamW`` (re-lays the
  parameters and gradients in memory with ``npu_combine_tensors``, which fights megatron-core's gradient buffers, and
  rejects ``zero_grad(set_to_none=True)``).
* ``cuda``: ``torch.optim.AdamW(fused=True)`` (torch's CUDA kernel).
* ``cpu``: ``torch.optim.AdamW`` (torch's single-tensor loop: the reference implementation).

All three keep torch AdamW's state (``exp_avg``, ``exp_avg_sq``, ``step`` per parameter), so a checkpoint's optimizer
state means the same on every device. ``aquila_npu.compat.megatron_core.use_adam`` makes megatron-core build this
optimizer and treat it as the torch optimizer it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aquila_npu.compat.megatron_core import use_adam

FUSED_ON = ("npu", "cuda")  # devices whose torch (torch_npu) registers the fused AdamW kernel we use


@dataclass(frozen=True)
class AdamW:
    """``torch.optim.AdamW``, called the way megatron-core calls an Apex / TE FusedAdam."""

    fused: bool

    def __call__(self, params, *, lr: float, weight_decay: float, betas, eps: float,
                 adam_w_mode: bool = True) -> torch.optim.Optimizer:
        cls = torch.optim.AdamW if adam_w_mode else torch.optim.Adam  # decoupled weight decay (the default) or not
        return cls(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, fused=self.fused)

    def describe(self) -> str:
        return "torch.optim.AdamW(fused=True)" if self.fused else "torch.optim.AdamW (single-tensor)"


def for_device(device: str) -> AdamW:
    return AdamW(fused=device in FUSED_ON)


def get_megatron_optimizer(config, model_chunks, device: str):
    """megatron-core's optimizer (its mixed-precision / distributed wrappers) around ``for_device(device)``."""
    from megatron.core.optimizer import get_megatron_optimizer as mcore_get_megatron_optimizer

    use_adam(for_device(device))
    return mcore_get_megatron_optimizer(config, model_chunks)
