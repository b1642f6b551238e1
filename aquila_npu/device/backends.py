"""megatron-core ``BackendSpecProvider``s for the three devices.

The ModelLink switches choose fused modules: ``--use-fused-rmsnorm``, ``--use-flash-attn``,
``--use-fused-rotary-pos-emb``, ``--use-fused-swiglu``, and on Ascend ``--use-mc2`` (sequence-parallel linears whose
all-gather / reduce-scatter run inside the matmul kernels). With none of them every backend builds the plain-PyTorch
modules of ``torch_modules``. Asking for a fused op the device cannot provide raises ``FusedKernelUnavailable``.
Parameter names and shapes never depend on the backend: fused modules subclass or mirror the plain ones.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, Optional

from megatron.core.models.backends import LocalSpecProvider
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from aquila_npu.device import npu_modules, torch_modules
from aquila_npu.device.fused import FusedOps  # noqa: F401 - its home is device.fused; imported from here too
from aquila_npu.errors import FusedKernelUnavailable


class TorchBackend(LocalSpecProvider):
    """Plain PyTorch: megatron-core's local tensor-parallel linears, Aquila RMSNorm, SDPA attention."""

    name = "torch"

    def __init__(self, fused: FusedOps = FusedOps()):
        self.fused = fused

    def column_parallel_linear(self) -> type:
        return ColumnParallelLinear

    def row_parallel_linear(self) -> type:
        return RowParallelLinear

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return torch_modules.RMSNorm

    def core_attention(self) -> type:
        return torch_modules.SDPAAttention

    def activation_func(self) -> Optional[type]:
        """A module applied to the whole [gate | up] fc1 output, or None for megatron-core's own SwiGLU."""
        return None

    def rope_fn(self) -> Optional[Callable]:
        """A fused rotary function ``fn(t, freqs)`` for megatron-core's fused-RoPE slot (the device layer installs it;
        ``config_overrides`` then sets ``apply_rope_fusion``), or None for megatron-core's own choice."""
        return None

    def config_overrides(self) -> dict:
        """TransformerConfig fields this backend needs."""
        return {"use_te_activation_func": self.activation_func() is not None}

    def describe(self) -> str:
        """The modules this backend builds, for start-up banners (derived from the methods above, never written out):
        ``attention SDPAAttention, norm RMSNorm, rotary megatron-core, SwiGLU megatron-core``."""
        overrides = self.config_overrides()
        rope, act = self.rope_fn(), self.activation_func()
        rotary = (f"{rope.__name__} (megatron-core's fused slot)" if rope else
                  "megatron-core fused" if overrides.get("apply_rope_fusion") else "megatron-core")
        swiglu = (act.__name__ if act else
                  "megatron-core fused" if overrides.get("bias_activation_fusion") else "megatron-core")
        return (f"attention {self.core_attention().__name__}, norm {self.layer_norm(rms_norm=True).__name__}, "
                f"rotary {rotary}, SwiGLU {swiglu}")


class CpuBackend(TorchBackend):
    name = "cpu"

    def __init__(self, fused: FusedOps = FusedOps()):
        if fused.requested():
            raise FusedKernelUnavailable(
                f"{', '.join(fused.requested())}: the cpu device has no fused kernels; drop the switch or run on an "
                "Ascend NPU (torch_npu) or a CUDA GPU")
        super().__init__(fused)


class NpuBackend(TorchBackend):
    """Ascend fused kernels from torch_npu, each behind its ModelLink switch."""

    name = "npu"

    def column_parallel_linear(self) -> type:
        return npu_modules.Mc2ColumnParallelLinear if self.fused.mc2 else ColumnParallelLinear

    def row_parallel_linear(self) -> type:
        return npu_modules.Mc2RowParallelLinear if self.fused.mc2 else RowParallelLinear

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return npu_modules.NpuRMSNorm if self.fused.rmsnorm else torch_modules.RMSNorm

    def core_attention(self) -> type:
        return npu_modules.NpuFlashAttention if self.fused.flash_attn else torch_modules.SDPAAttention

    def activation_func(self) -> Optional[type]:
        return npu_modules.NpuSwiGLU if self.fused.swiglu else None

    def rope_fn(self) -> Optional[Callable]:
        return npu_modules.npu_rope if self.fused.rotary else None

    def config_overrides(self) -> dict:
        # Fused RoPE through megatron-core's own fused slot (aquila_npu.compat.megatron_core.provide_fused_rope).
        return {**super().config_overrides(), "apply_rope_fusion": self.fused.rotary}


def have_transformer_engine() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


class CudaBackend(TorchBackend):
    """NVIDIA GPUs. Fused switches use Transformer Engine (norm, attention, RoPE); the SwiGLU switch uses
    megatron-core's own fused bias-SwiGLU kernel. Without a switch: plain modules (SDPA picks flash kernels itself)."""

    name = "cuda"

    def __init__(self, fused: FusedOps = FusedOps()):
        if fused.mc2:
            raise FusedKernelUnavailable("--use-mc2 is Ascend's MC2 (torch_npu kernels): drop it on cuda "
                                         "(megatron-core overlaps tensor-parallel communication there with Transformer "
                                         "Engine)")
        needs_te = [FusedOps.SWITCHES[name][0] for name in ("rmsnorm", "flash_attn", "rotary") if getattr(fused, name)]
        if needs_te and not have_transformer_engine():
            raise FusedKernelUnavailable(
                f"{', '.join(needs_te)} on cuda needs Transformer Engine (pip install transformer_engine[pytorch]); "
                "it is not installed")
        super().__init__(fused)

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        if self.fused.rmsnorm:
            from megatron.core.extensions.transformer_engine import TENorm
            return TENorm
        return torch_modules.RMSNorm

    def core_attention(self) -> type:
        if self.fused.flash_attn:
            from megatron.core.extensions.transformer_engine import TEDotProductAttention
            return TEDotProductAttention
        return torch_modules.SDPAAttention

    def config_overrides(self) -> dict:
        return {"use_te_activation_func": False, "bias_activation_fusion": self.fused.swiglu,
                "apply_rope_fusion": self.fused.rotary}


BACKENDS = {"cpu": CpuBackend, "cuda": CudaBackend, "npu": NpuBackend}


def make_backend(kernels: str, fused: FusedOps = FusedOps()) -> TorchBackend:
    try:
        cls = BACKENDS[kernels]
    except KeyError:
        raise ValueError(f"unknown device {kernels!r}; choose one of {', '.join(BACKENDS)}") from None
    return cls(fused)
