"""Plain-PyTorch modules for megatron-core layer specs: every device can run them.

They are the reference the fused modules are checked against, and they own the parameter names every backend
shares (an RMSNorm has one parameter, ``weight``; core attention has none).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Tuple

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide
from torch import Tensor


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """AquilaRMSNorm: normalise in fp32 and multiply by the weight in fp32, then cast back to the input dtype.
    (LLaMA's RMSNorm casts to the input dtype before the multiplication; that is Aquila's one numeric difference.)"""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


class RMSNorm(torch.nn.Module):
    """RMSNorm with Aquila numerics. Built by megatron-core as ``norm(config=, hidden_size=, eps=)``."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device="cpu" if config.use_cpu_initialization else None)
        )
        # With sequence parallelism each TP rank sees a slice of the tokens: megatron-core all-reduces these grads.
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm_reference(x, self.weight, self.eps)


def document_lengths(packed_seq_params) -> Tuple[int, ...]:
    """The documents' lengths of megatron-core's packed-sequence parameters (``thd``): the Python ints training
    computed once per micro-batch where it gives them (``aquila_npu.training.packing.PackedDocuments.lengths``),
    else from the cumulative boundaries (one device-to-host copy)."""
    if packed_seq_params.qkv_format != "thd":
        raise ValueError(f"packed sequences in the {packed_seq_params.qkv_format!r} format are not supported (thd)")
    lengths = getattr(packed_seq_params, "lengths", None)
    if lengths:
        return tuple(lengths)
    cu = packed_seq_params.cu_seqlens_q
    return tuple((cu[1:] - cu[:-1]).tolist())


def causal_mask(sq: int, sk: int, device=None) -> Tensor:
    """Boolean [sq, sk] mask, True = masked, causal with the queries aligned to the END of the keys
    (query i sits at key position sk - sq + i), which covers training (sq == sk) and KV-cache decoding."""
    q_pos = torch.arange(sk - sq, sk, device=device).unsqueeze(1)
    k_pos = torch.arange(sk, device=device).unsqueeze(0)
    return k_pos > q_pos


@functools.lru_cache(maxsize=8)
def shared_causal_mask(sq: int, sk: int, device: torch.device) -> Tensor:
    """``causal_mask`` built once per (sq, sk, device) and shared by every layer and micro-batch (read-only: never
    modify it). Built outside inference mode, so a mask first made while generating can still be saved for a
    backward pass later. A few shapes are kept (training uses one; prefill in generation a few)."""
    with torch.inference_mode(False):
        return causal_mask(sq, sk, device)


class CoreAttentionBase(MegatronModule):
    """Shared set-up for the core attention modules: heads per partition, scale, dropout, mask handling.

    Inputs follow megatron-core's ``sbhd`` convention: query [sq, b, np, hn], key/value [sk, b, ng, hn];
    the output is [sq, b, np * hn]. ``attention_mask`` is boolean, True = masked, broadcastable to [b, 1, sq, sk];
    with ``attention_mask=None`` and a causal layer, a causal mask is implied: ``implicit_causal`` self-attention
    over equal lengths. A kernel with its own causal mode sets ``needs_causal_mask = False`` and gets ``mask=None``
    there (no [S, S] tensor at all); the others get the one shared mask (``shared_causal_mask``).

    Packed documents (megatron-core's ``thd`` format, ``packed_seq_params``: query [t, np, hn], key/value
    [t, ng, hn], the output [t, np * hn]): causal attention within each document, never across
    (``attend_documents``; by default each document through ``attend`` as a sequence of its own, which costs the sum
    of the documents' squares, not the square of the whole).
    """

    needs_causal_mask = True

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        assert config.context_parallel_size == 1, "context parallelism is not supported by this core attention"
        tp = config.tensor_model_parallel_size
        self.num_heads = divide(config.num_attention_heads, tp)
        self.num_groups = divide(config.num_query_groups or config.num_attention_heads, tp)
        self.head_dim = config.kv_channels
        self.attn_mask_type = attn_mask_type
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def mask_for(self, attention_mask: Optional[Tensor], attn_mask_type, sq: int, sk: int, device) -> Optional[Tensor]:
        """The boolean mask to apply (True = masked), or None for 'no mask at all'."""
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if attention_mask is not None:
            return attention_mask.bool()
        if mask_type == AttnMaskType.causal and sq > 1:
            return shared_causal_mask(sq, sk, torch.device(device))
        return None

    def is_implicit_causal(self, attention_mask: Optional[Tensor], attn_mask_type, sq: int, sk: int) -> bool:
        """No mask given, a causal layer, self-attention over equal lengths (training, prefill)."""
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        return attention_mask is None and mask_type == AttnMaskType.causal and sq == sk and sq > 1

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type=None, attention_bias=None, packed_seq_params=None) -> Tensor:
        assert attention_bias is None, "attention bias is not supported"
        dropout_p = self.dropout_p if self.training else 0.0
        if packed_seq_params is not None:
            lengths = document_lengths(packed_seq_params)
            call = functools.partial(self.attend_documents, query, key, value, lengths, dropout_p)
        else:
            sq, sk = query.shape[0], key.shape[0]
            implicit_causal = self.is_implicit_causal(attention_mask, attn_mask_type, sq, sk)
            mask = None if implicit_causal and not self.needs_causal_mask else \
                self.mask_for(attention_mask, attn_mask_type, sq, sk, query.device)
            call = functools.partial(self.attend, query, key, value, mask, implicit_causal, dropout_p)
        if dropout_p == 0.0:  # no random numbers drawn: forking the tracker's RNG state would change nothing
            return call()
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return call()

    def attend_documents(self, query: Tensor, key: Tensor, value: Tensor, lengths: Sequence[int],
                         dropout_p: float) -> Tensor:
        """[t, np*hn] from thd q/k/v holding documents of ``lengths`` one after the other: each document's causal
        self-attention through ``attend`` (a sequence of its own, batch 1)."""
        out, at = [], 0
        for n in lengths:
            q, k, v = (x[at:at + n].unsqueeze(1) for x in (query, key, value))
            causal = n > 1
            mask = shared_causal_mask(n, n, query.device) if causal and self.needs_causal_mask else None
            out.append(self.attend(q, k, v, mask, causal, dropout_p))
            at += n
        return torch.cat(out).reshape(at, -1)

    def attend(self, query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor], implicit_causal: bool,
               dropout_p: float) -> Tensor:
        """[sq, b, np*hn] from sbhd q/k/v; ``mask`` True = masked; ``implicit_causal``: the plain causal mask over
        equal lengths (kernels with causal sparsity can use it; ``mask`` is then the shared causal mask, or None
        where the class sets ``needs_causal_mask = False``)."""
        raise NotImplementedError


class SDPAAttention(CoreAttentionBase):
    """Core attention with ``torch.nn.functional.scaled_dot_product_attention`` (GQA without repeating K/V).
    Causal self-attention uses SDPA's own ``is_causal`` (no mask tensor; on CPU the same flash kernel and bit-equal
    results as the explicit mask, tests/test_backends.py; on CUDA it lets SDPA pick its flash kernel)."""

    needs_causal_mask = False

    def attend(self, query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor], implicit_causal: bool,
               dropout_p: float) -> Tensor:
        sq, b, np_, hn = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=None if mask is None else ~mask, dropout_p=dropout_p, scale=self.scale,
            is_causal=implicit_causal and mask is None, enable_gqa=self.num_heads != self.num_groups,
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)
