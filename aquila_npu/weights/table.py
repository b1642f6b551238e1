"""The one table of the weight mapping between Hugging Face Aquila2/LLaMA and megatron-core (``TABLE``; how each row
is split and packed: ``aquila_npu.weights.mapping``), and the LoRA rows and names derived from it. Importing this
module imports neither torch nor megatron-core (the commands' parsers read ``LORA_TARGETS``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class Row:
    mcore: str  # megatron-core name; "{i}" is the layer index
    hf: Tuple[str, ...]  # HF names; "{i}" is the layer index
    kind: str  # replicated / column / row / vocab / qkv / wpack / swiglu
    where: str  # first (stage 0) / last (last stage) / layer


TABLE: Tuple[Row, ...] = (
    Row("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", "first"),
    Row("decoder.layers.{i}.input_layernorm.weight", ("model.layers.{i}.input_layernorm.weight",), "replicated",
        "layer"),
    Row("decoder.layers.{i}.self_attention.linear_qkv.weight",
        ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
         "model.layers.{i}.self_attn.v_proj.weight"), "qkv", "layer"),
    Row("decoder.layers.{i}.self_attention.linear_proj.weight", ("model.layers.{i}.self_attn.o_proj.weight",), "row",
        "layer"),
    Row("decoder.layers.{i}.pre_mlp_layernorm.weight", ("model.layers.{i}.post_attention_layernorm.weight",),
        "replicated", "layer"),
    Row("decoder.layers.{i}.mlp.linear_fc1.weight",
        ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"), "swiglu", "layer"),
    Row("decoder.layers.{i}.mlp.linear_fc2.weight", ("model.layers.{i}.mlp.down_proj.weight",), "row", "layer"),
    Row("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated", "last"),
    Row("output_layer.weight", ("lm_head.weight",), "vocab", "last"),
)

# Baichuan2 (model_type "baichuan"): the attention's q, k, v are one HF tensor, ``W_pack`` ([q; k; v] rows, each
# hidden_size: Baichuan2's modeling_baichuan.py unflattens the product into (3, hidden)), split per query group as the
# ``qkv`` row; the output layer's raw weight (NormHead normalises it in the forward, the checkpoint keeps it as is).
BAICHUAN_TABLE: Tuple[Row, ...] = tuple(
    Row(r.mcore, ("model.layers.{i}.self_attn.W_pack.weight",), "wpack", r.where) if r.kind == "qkv" else r
    for r in TABLE)

_TABLES = {"aquila": TABLE, "baichuan": BAICHUAN_TABLE}


def table_for(family: str) -> Tuple[Row, ...]:
    """The table of a model family (``ModelSpec.family``)."""
    try:
        return _TABLES[family]
    except KeyError:
        raise ValueError(f"no weight table for model family {family!r}; known: {', '.join(_TABLES)}") from None


# HF keys that carry no weights of the model (old Aquila .bin checkpoints hold rotary buffers).
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------------------------------------------
# LoRA adapters: rows derived from TABLE
# ----------------------------------------------------------------------------------------------------------------

LORA_ADAPTER = "default"  # peft's adapter name, part of the megatron-core keys (MindSpeed-LLM's checkpoint layout)
PEFT_PREFIX = "base_model.model."  # peft's saved adapter keys: base_model.model.<HF module>.lora_A.weight
BASE_LAYER = "base_layer"  # peft's wrapped linear inside a LoRA layer


def lora_target(row: Row) -> Optional[str]:
    """The megatron-core linear a row is the weight of (``linear_qkv``, ...), None for norms and embeddings."""
    return row.mcore.split(".")[-2] if row.where == "layer" and row.kind != "replicated" else None


LORA_TARGETS: Tuple[str, ...] = tuple(t for t in map(lora_target, TABLE) if t)


def _lora_pair(row: Row) -> Tuple[Row, Row]:
    pair = []
    for which, kind in (("A", "row" if row.kind == "row" else "shared"),
                        ("B", "replicated" if row.kind == "row" else row.kind)):
        pair.append(Row(row.mcore.replace(".weight", f".lora_{which}.{LORA_ADAPTER}.weight"),
                        tuple(PEFT_PREFIX + h.replace(".weight", f".lora_{which}.weight") for h in row.hf),
                        kind, row.where))
    return pair[0], pair[1]


# target -> (row of its LoRA A, row of its LoRA B)
LORA_PAIRS: Dict[str, Tuple[Row, Row]] = {lora_target(r): _lora_pair(r) for r in TABLE if lora_target(r)}


def lora_model_key(key: str, targets) -> str:
    """A base-checkpoint key as named in a model whose ``targets`` linears carry adapters
    (``...linear_qkv.weight`` -> ``...linear_qkv.base_layer.weight``); other keys unchanged."""
    parts = key.split(".")
    if len(parts) >= 2 and parts[-2] in targets:
        return ".".join(parts[:-1] + [BASE_LAYER, parts[-1]])
    return key


def lora_checkpoint_key(key: str) -> str:
    """The inverse of ``lora_model_key``: the base checkpoint's name of a model key."""
    return key.replace(f".{BASE_LAYER}.", ".")
