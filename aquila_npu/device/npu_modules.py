"""Modules built on Ascend's fused kernels (torch_npu). Same parameters as the plain modules they replace.

``torch_npu`` is imported when a module is built or called, never when this file is imported, so the npu backend's
code can be exercised on a CPU with the emulator in ``aquila_npu.testing.npu_emulator``.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor

from aquila_npu.device.torch_modules import CoreAttentionBase, RMSNorm


def torch_npu():
    return importlib.import_module("torch_npu")


class NpuRMSNorm(RMSNorm):
    """``torch_npu.npu_rms_norm``; it returns ``(y, rstd)``."""

    def forward(self, x: Tensor) -> Tensor:
        return torch_npu().npu_rms_norm(x, self.weight, epsilon=self.eps)[0]


class NpuSwiGLU(torch.nn.Module):
    """``torch_npu.npu_swiglu`` on megatron-core's packed [gate | up] fc1 output: silu(gate) * up."""

    def __init__(self, config=None, **unused):
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return torch_npu().npu_swiglu(x, dim=-1)


def npu_rope(t: Tensor, freqs: Tensor) -> Tensor:
    """Rotary embedding with ``torch_npu.npu_rotary_mul`` (rotate-half). t: [s, b, n, d]; freqs: [s, 1, 1, d]."""
    rot_dim = freqs.shape[-1]
    t_rot, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    cos, sin = freqs.cos().to(t.dtype), freqs.sin().to(t.dtype)
    # megatron-core's q/k are strided views of the fused QKV output; the kernel wants contiguous input
    out = torch_npu().npu_rotary_mul(t_rot.contiguous(), cos, sin)
    return out if t_pass.shape[-1] == 0 else torch.cat((out, t_pass), dim=-1)


class NpuFlashAttention(CoreAttentionBase):
    """Core attention with ``torch_npu.npu_fusion_attention`` in the ``SBH`` layout megatron-core produces.

    GQA: the kernel takes fewer K/V heads than query heads (Nq/Nkv integer), so K/V are never repeated in memory.
    Causal self-attention over equal lengths uses the kernel's causal sparsity (lower-triangular mask,
    ``next_tockens=0``); any other mask (padding, KV-cache decoding) is passed whole with the default token window.
    """

    def attend(self, query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor], implicit_causal: bool,
               dropout_p: float) -> Tensor:
        sq, b, np_, _ = query.shape
        sk = key.shape[0]
        window = dict(pre_tockens=sk, next_tockens=0) if implicit_causal else {}
        return torch_npu().npu_fusion_attention(
            query.reshape(sq, b, -1), key.reshape(sk, b, -1), value.reshape(sk, b, -1), np_, "SBH",
            atten_mask=mask, scale=self.scale, keep_prob=1.0 - dropout_p, sparse_mode=0, **window,
        )[0]
