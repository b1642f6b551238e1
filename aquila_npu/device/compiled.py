"""``--compile-elementwise``: the elementwise regions of a layer through ``torch.compile`` (a stock torch's inductor:
Triton on CUDA, C++ on the CPU), around any backend of ``aquila_npu.device.backends``.

* RMSNorm: ``CompiledRMSNorm``, our module with ``rms_norm_reference`` compiled (the same parameters);
* SwiGLU and the residual add: megatron-core's own fused functions (``bias_swiglu_impl``, ``bias_dropout_add``), which
  are ``torch.compile``'d by ``megatron.core.jit.jit_fuser``: its ``bias_activation_fusion`` and
  ``bias_dropout_fusion`` config switches.

RoPE stays megatron-core's (its fused slot is Transformer Engine's kernel on CUDA). The NPU is refused before this is
built (``aquila_npu.training.speed.check_device``): its fused kernels are the ModelLink switches.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from aquila_npu.device import torch_modules


@functools.lru_cache(maxsize=None)
def _compiled_rms_norm():
    return torch.compile(torch_modules.rms_norm_reference, dynamic=False)


class CompiledRMSNorm(torch_modules.RMSNorm):
    """``torch_modules.RMSNorm`` with its function compiled once per process."""

    def forward(self, x: Tensor) -> Tensor:
        return _compiled_rms_norm()(x, self.weight, self.eps)


class CompiledBackend:
    """A backend whose plain RMSNorm is ``CompiledRMSNorm`` and whose config turns on megatron-core's compiled
    SwiGLU and residual add; everything else is the wrapped backend's."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        cls = self.inner.layer_norm(rms_norm=rms_norm, for_qk=for_qk)
        return CompiledRMSNorm if cls is torch_modules.RMSNorm else cls

    def config_overrides(self) -> dict:
        out = dict(self.inner.config_overrides())
        out["bias_dropout_fusion"] = True
        if self.inner.activation_func() is None:  # megatron-core's SwiGLU (not a fused module of the backend)
            out.update(bias_activation_fusion=True, use_te_activation_func=False)
        return out

    def describe(self) -> str:
        return f"{self.inner.describe()}; torch.compile: RMSNorm, SwiGLU, residual add"
