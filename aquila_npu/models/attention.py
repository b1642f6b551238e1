"""Aquila2's self-attention: megatron-core's ``SelfAttention`` whose keys enter the static KV cache already rotated
(``aquila_npu.compat.megatron_core.RotatedKeyCache``: megatron-core 0.16.1 rotates the whole cache again at every
decoding step; tests/test_kv_cache_rope.py: bit-identical logits, no RoPE over cached positions). Only the
static-batch inference path changes; training and every other path run megatron-core's code. Parameters and their
names are megatron-core's.
"""

from __future__ import annotations

from megatron.core.transformer import attention as mcore_attention

from aquila_npu.compat.megatron_core import RotatedKeyCache


class SelfAttention(RotatedKeyCache, mcore_attention.SelfAttention):
    """megatron-core's SelfAttention with keys rotated once, as they enter the static KV cache."""
