"""FlagAI's own layout of the first-generation Aquila weights (``AQUILAModel`` state dicts, as FlagAI's ``AutoLoader``
reads and its trainer writes them) <-> the Hugging Face names of the one mapping table.

FlagAI's key names (flagai/model/aquila_model.py, blocks/aquila_block.py, layers/attentions.AQUILAAttention,
layers/feedforward.AQUILAForward)::

    tok_embeddings.weight                     model.embed_tokens.weight
    layers.{i}.attention.wq / wk / wv / wo    model.layers.{i}.self_attn.q_proj / k_proj / v_proj / o_proj
    layers.{i}.feed_forward.w1 / w3 / w2      model.layers.{i}.mlp.gate_proj / up_proj / down_proj
    layers.{i}.attention_norm                 model.layers.{i}.input_layernorm
    layers.{i}.ffn_norm                       model.layers.{i}.post_attention_layernorm
    norm.weight / output.weight               model.norm.weight / lm_head.weight

FlagAI rotates queries and keys as Meta's LLaMA does, in complex pairs of adjacent dimensions
(``layers/attentions.apply_rotary_pos_emb``: ``view_as_complex`` of ``[..., d/2, 2]``); Hugging Face's Aquila code and
megatron-core rotate halves (dimension ``j`` with ``j + d/2``). Within each head, FlagAI's rows ``2j, 2j + 1`` of
``wq`` / ``wk`` are Hugging Face's rows ``j, j + d/2``: a reordering of rows, so nothing is computed and a round trip
is bit for bit. Importing this module does not import torch.
"""

from __future__ import annotations

import re

_LAYER = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
        "lm_head.weight": "output.weight"}
ROTATED = ("self_attn.q_proj", "self_attn.k_proj")  # rows in interleaved RoPE order in FlagAI's layout
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight$")


def flagai_key(hf_name: str) -> str:
    """FlagAI's key of the Hugging Face tensor ``hf_name``."""
    if hf_name in _TOP:
        return _TOP[hf_name]
    m = _HF_LAYER.match(hf_name)
    if not m or m.group(2) not in _LAYER:
        raise KeyError(f"{hf_name} has no FlagAI counterpart")
    return f"layers.{m.group(1)}.{_LAYER[m.group(2)]}.weight"


def rotated(hf_name: str) -> bool:
    """Whether the rows of ``hf_name`` are reordered between the layouts (the query and key projections)."""
    m = _HF_LAYER.match(hf_name)
    return bool(m) and m.group(2) in ROTATED


def interleaved_to_halves(w, heads: int):
    """FlagAI's ``wq`` / ``wk`` rows (per head: RoPE pairs ``2j, 2j + 1``) in Hugging Face's order (``j, j + d/2``)."""
    out, inp = w.shape
    return w.reshape(heads, out // heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)

