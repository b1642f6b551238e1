"""Hugging Face ``config.json`` -> ModelSpec (no megatron-core import: the converter needs only this): Llama /
Aquila2 (``llama``, ``aquila``) and Baichuan2 (``baichuan``: ``baichuan_fields``)."""

from __future__ import annotations

import json
import os
from typing import Optional, Union

from aquila_npu.errors import CheckpointError, NotAquilaConfig
from aquila_npu.models.registry import ModelSpec, entry_named


# RoPE scalings transformers knows that we do not implement: refused by name, never dropped.
_UNIMPLEMENTED_ROPE = {"dynamic": "dynamic NTK", "yarn": "YaRN", "longrope": "LongRoPE", "su": "LongRoPE ('su')",
                       "llama3": "Llama 3's frequency scaling", "ntk": "NTK-aware"}


def _rope_dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def rope_scaling_factor(cfg: dict, where: str = "config") -> Optional[float]:
    """The linear RoPE scaling (position interpolation) factor of a HF config, None without scaling.

    Every form transformers has written is read: ``rope_scaling`` with ``type`` (transformers 4 before 4.45) or
    ``rope_type`` (later 4.x), and transformers 5's ``rope_parameters`` (``rope_type``, ``factor``, ``rope_theta``;
    no ``rope_scaling`` key at all). A scaling we do not implement (dynamic NTK, YaRN, ...) is refused in one line
    naming it; two forms that disagree are refused too."""
    found = {}
    for key in ("rope_scaling", "rope_parameters"):
        value = cfg.get(key)
        if value is None or value == {}:
            continue
        if not isinstance(value, dict):
            raise NotAquilaConfig(f"{where}: {key} {value!r} is not an object")
        kind = value.get("rope_type", value.get("type", "default"))
        if kind == "default":
            continue
        if kind != "linear":
            name = _UNIMPLEMENTED_ROPE.get(kind, "an unknown scaling")
            raise NotAquilaConfig(f"{where}: {key} type {kind!r} ({name}) is not implemented: only linear position "
                                  "interpolation (the type of the Aquila2 16K models) is; converting without it "
                                  "would change the model")
        try:
            factor = float(value["factor"])
        except (KeyError, TypeError, ValueError):
            raise NotAquilaConfig(f"{where}: {key} {value!r}: linear scaling needs a number 'factor'") from None
        if not factor > 0:
            raise NotAquilaConfig(f"{where}: {key} factor {factor:g} must be > 0")
        found[key] = factor
    if len(set(found.values())) > 1:
        raise NotAquilaConfig(f"{where}: rope_scaling (factor {found['rope_scaling']:g}) and rope_parameters "
                              f"(factor {found['rope_parameters']:g}) disagree")
    factor = next(iter(found.values()), None)
    return None if factor is None or factor == 1.0 else factor


def spec_from_hf_config(cfg: Union[str, os.PathLike, dict], name: Optional[str] = None) -> ModelSpec:
    """Read a HF ``config.json`` (``model_type`` ``llama`` or Aquila2's own ``aquila``) into a ModelSpec."""
    path = None
    if not isinstance(cfg, dict):
        path = os.fspath(cfg)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        except FileNotFoundError:
            raise CheckpointError(f"no Hugging Face config at {path}") from None
        except json.JSONDecodeError as e:
            raise NotAquilaConfig(f"{path} is not valid JSON: {e}") from None
    where = path or "config"
    model_type = cfg.get("model_type")
    if model_type not in ("llama", "aquila", "baichuan"):
        raise NotAquilaConfig(f"{where}: model_type {model_type!r} is not 'llama', 'aquila' or 'baichuan'")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if k not in cfg]
    if missing:
        raise NotAquilaConfig(f"{where}: missing {', '.join(missing)}")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise NotAquilaConfig(f"{where}: biases in attention/MLP are not Aquila2-shaped")
    if cfg.get("hidden_act", "silu") != "silu":
        raise NotAquilaConfig(f"{where}: hidden_act {cfg['hidden_act']!r} is not silu (SwiGLU)")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim * cfg["num_attention_heads"] != cfg["hidden_size"]:
        raise NotAquilaConfig(f"{where}: head_dim {head_dim} x heads != hidden_size")
    factor = rope_scaling_factor(cfg, where)

    def token_id(key, default):
        v = cfg.get(key, default)
        return v[0] if isinstance(v, list) else v

    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    name = name or cfg.get("_name_or_path") or (os.path.basename(os.path.dirname(os.path.abspath(path)))
                                                  if path else "") or "hf-model"
    entry = entry_named(name)  # a folder named as a registry model: its chat template and generation
    family = baichuan_fields(cfg, where, entry) if model_type == "baichuan" else {}
    return ModelSpec(
        **family,
        name=name,
        chat_template=entry.chat_template if entry else None,
        generation=entry.generation if entry else 2,
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg.get("max_position_embeddings") or cfg.get("model_max_length") or 2048,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),  # LlamaConfig's and FlagAI's AquilaConfig's default
        # transformers 5's order: rope_parameters' theta first, then the top-level key of earlier configs
        rope_theta=float(_rope_dict(cfg.get("rope_parameters")).get("rope_theta") or cfg.get("rope_theta") or 10000.0),
        rope_scaling_factor=factor,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=token_id("bos_token_id", 1),
        eos_token_id=token_id("eos_token_id", 2),
        pad_token_id=token_id("pad_token_id", 0) if cfg.get("pad_token_id") is not None else 0,
        torch_dtype=str(dtype).replace("torch.", ""),  # config.json text, e.g. "bfloat16"
        source=where,
    )


def baichuan_fields(cfg: dict, where: str, entry: Optional[ModelSpec]) -> dict:
    """The ModelSpec fields of a Baichuan ``config.json`` (``model_type`` ``baichuan``, ``BaichuanForCausalLM``) that
    its keys do not say: the position scheme and the output layer, which Baichuan's model code fixes per model.
    Read from our own keys when present (``position_embedding_type``, ``norm_head``: written by our converter), else
    from a registry entry the folder is named after, else by vLLM's rules (``vllm/model_executor/models/baichuan.py``:
    hidden size 4096 is Baichuan2-7B with RoPE, any other ALiBi; vocabulary 125696 is Baichuan2, whose ``lm_head`` is
    NormHead)."""
    position = cfg.get("position_embedding_type")
    if position is None:
        position = entry.position_embedding if entry else ("rope" if cfg.get("hidden_size") == 4096 else "alibi")
    if position not in ("rope", "alibi"):
        raise NotAquilaConfig(f"{where}: position_embedding_type {position!r} is not 'rope' or 'alibi'")
    norm_head = cfg.get("norm_head")
    if norm_head is None:
        norm_head = entry.output_layer == "normhead" if entry else cfg.get("vocab_size") == 125696
    if cfg.get("num_key_value_heads") not in (None, cfg.get("num_attention_heads")):
        raise NotAquilaConfig(f"{where}: a Baichuan W_pack holds as many key/value heads as query heads")
    return dict(family="baichuan", position_embedding=position, output_layer="normhead" if norm_head else "linear")
