"""Aquila2's self-attention: megatron-core's ``SelfAttention`` whose keys enter the static KV cache already rotated.

megatron-core 0.16.1's static-batch KV cache (``StaticInferenceContext``, what ``GPTInferenceWrapper`` generates with)
stores keys before the rotary embedding and, at every decoding step, rotates the whole cache again: in each layer
the keys of all positions so far go through RoPE's multiplications, ``cat`` and additions, although only one
position is new. Decoding after a 900-token prompt spent most of its step there (torch profiler, CPU, 135M model,
batch 8: element-wise ops on [900, 8, 3, 64] keys in every layer). Its alternatives do not fit: ``flash_decode``
needs the CUDA flash-attn package, the dynamic context flash-attn >= 2.7.3.

Here each key is rotated once, when it enters the cache, with megatron-core's own function and the same cos/sin of
its position, so the cache holds exactly what megatron-core would compute again at every step (element-wise
operations: bit for bit the same attention inputs, tests/test_kv_cache_rope.py). Only the static-batch inference path
changes; training and every other path run megatron-core's code. Parameters and their names are megatron-core's.
"""

from __future__ import annotations

from megatron.core.transformer import attention as mcore_attention


class SelfAttention(mcore_attention.SelfAttention):

    def _adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb,
                                        rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                                        sequence_len_offset=None, **kwargs):
        # `any(e is None ...)`, not `None in rotary_pos_emb`: that compares tensors with None (20 us, every layer)
        plain = (inference_context is None or not inference_context.is_static_batching() or self.config.flash_decode
                 or not isinstance(rotary_pos_emb, tuple) or any(e is None for e in rotary_pos_emb))
        if plain:
            return super()._adjust_key_value_for_inference(inference_context, query, key, value, rotary_pos_emb,
                                                           rotary_pos_cos, rotary_pos_sin, rotary_pos_cos_sin,
                                                           sequence_len_offset, **kwargs)
        q_pos_emb, k_pos_emb = rotary_pos_emb
        start = inference_context.sequence_len_offset
        end = start + key.size(0)
        # What megatron-core's forward applies to the keys read back from the cache, for the new positions only.
        key = mcore_attention.apply_rotary_pos_emb(
            key, k_pos_emb[start:end], config=self.config, cu_seqlens=None,
            mscale=mcore_attention._yarn_get_concentration_factor_from_config(self.config),
            cp_group=self.pg_collection.cp)
        query, key, value, _, attn_mask_type, block_table = super()._adjust_key_value_for_inference(
            inference_context, query, key, value, None, rotary_pos_cos, rotary_pos_sin, rotary_pos_cos_sin,
            sequence_len_offset, **kwargs)
        # The queries are rotated by megatron-core's forward as before; the keys already are.
        return query, key, value, (q_pos_emb[start:end], None), attn_mask_type, block_table
