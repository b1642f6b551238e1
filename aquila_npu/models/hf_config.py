"""Hugging Face ``config.json`` -> ModelSpec (no megatron-core import: the converter needs only this)."""

from __future__ import annotations

import json
import os
from typing import Optional, Union

from aquila_npu.errors import CheckpointError, NotAquilaConfig
from aquila_npu.models.registry import ModelSpec, chat_template_for


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
    if model_type not in ("llama", "aquila"):
        raise NotAquilaConfig(f"{where}: model_type {model_type!r} is not 'llama' or 'aquila'")
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
    scaling = cfg.get("rope_scaling") or None
    factor = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ("linear", "default"):
            raise NotAquilaConfig(f"{where}: rope_scaling type {kind!r} is not supported (only linear)")
        factor = float(scaling["factor"]) if kind == "linear" else None

    def token_id(key, default):
        v = cfg.get(key, default)
        return v[0] if isinstance(v, list) else v

    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    name = name or cfg.get("_name_or_path") or (os.path.basename(os.path.dirname(os.path.abspath(path)))
                                                  if path else "") or "hf-model"
    return ModelSpec(
        name=name,
        chat_template=chat_template_for(name),
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6 if model_type == "llama" else 1e-5),
        rope_theta=float(cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
        rope_scaling_factor=factor,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=token_id("bos_token_id", 1),
        eos_token_id=token_id("eos_token_id", 2),
        pad_token_id=token_id("pad_token_id", 0) if cfg.get("pad_token_id") is not None else 0,
        torch_dtype=str(dtype).replace("torch.", ""),  # config.json text, e.g. "bfloat16"
        source=where,
    )
