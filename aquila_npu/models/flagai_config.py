"""FlagAI's first-generation Aquila folders (Aquila-7B, AquilaChat-7B, AquilaCode-7B-*, seed 001): the
``config.json`` FlagAI's ``AutoLoader`` reads (its own keys, not Hugging Face's) -> ModelSpec. No torch.

FlagAI's ``AQUILAConfig`` / ``AQUILAModel`` (flagai/model/aquila_model.py) read ``dim``, ``n_layers``, ``n_heads``,
``vocab_size``, ``max_seq_len`` (default 2048), ``multiple_of`` and ``norm_eps`` (default 1e-6); the SwiGLU size is
derived as in LLaMA (``blocks/aquila_block.py`` passes ``4 * dim`` to ``layers/feedforward.AQUILAForward``, which
takes two thirds and rounds up to a multiple of ``multiple_of``); every head has its own keys and values; RoPE theta
10000. What else a FlagAI config holds (``initializer_range``, ``flash_atten``, ...) does not change the model,
except ``flash_atten_aquila_style``, whose checkpoints hold one fused ``Wqkv``: refused.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Union

from aquila_npu.errors import CheckpointError, NotAquilaConfig
from aquila_npu.models.registry import ModelSpec, entry_named

REQUIRED = ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of")


def is_flagai_config(cfg: dict) -> bool:
    """A FlagAI first-generation config (``dim`` / ``n_layers``, no Hugging Face ``model_type``)."""
    return isinstance(cfg, dict) and "dim" in cfg and "n_layers" in cfg and "model_type" not in cfg


def read_config(path: str) -> dict:
    """The JSON of ``path`` (a folder: its config.json); CheckpointError naming the file when unreadable."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"no config at {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NotAquilaConfig(f"{path} is not valid JSON: {e}") from None


def ffn_size(dim: int, multiple_of: int) -> int:
    """FlagAI's SwiGLU size for ``dim`` (``AQUILAForward`` with hidden_dim ``4 * dim``)."""
    hidden = int(2 * (4 * dim) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def spec_from_flagai_config(cfg: Union[str, os.PathLike, dict], name: Optional[str] = None) -> ModelSpec:
    """A FlagAI first-generation ``config.json`` (or its folder) as a ModelSpec, named after its folder (FlagAI's
    model folders carry the model's name: ``checkpoints_in/aquilachat-7b``)."""
    path = None
    if not isinstance(cfg, dict):
        path = os.fspath(cfg)
        cfg = read_config(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
    where = path or "config"
    if not is_flagai_config(cfg):
        raise NotAquilaConfig(f"{where}: not a FlagAI Aquila config (no 'dim' / 'n_layers')")
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise NotAquilaConfig(f"{where}: missing {', '.join(missing)}")
    for key in REQUIRED + ("max_seq_len",):
        if key in cfg and (not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1):
            raise NotAquilaConfig(f"{where}: {key} {cfg[key]!r} is not a positive integer")
    if cfg.get("flash_atten_aquila_style"):
        raise NotAquilaConfig(f"{where}: flash_atten_aquila_style checkpoints (one fused Wqkv, flash-attn's rotary) "
                              "are not read; save the model from FlagAI without it")
    dim, heads = cfg["dim"], cfg["n_heads"]
    if dim % heads or (dim // heads) % 2:
        raise NotAquilaConfig(f"{where}: dim {dim} is not n_heads {heads} x an even head size")
    if not name:
        name = os.path.basename(os.path.dirname(os.path.abspath(path))) if path else "flagai-model"
    entry = entry_named(name)
    return ModelSpec(
        name=name,
        hidden_size=dim,
        intermediate_size=ffn_size(dim, cfg["multiple_of"]),
        num_layers=cfg["n_layers"],
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg.get("max_seq_len", 2048),
        rms_norm_eps=float(cfg.get("norm_eps", 1e-6)),
        rope_theta=10000.0,
        tie_word_embeddings=False,
        torch_dtype="float16",  # FlagAI's checkpoints of these models; a .bin's own dtype decides the conversion
        source=where,
        chat_template=entry.chat_template if entry else None,
        generation=1,
    )
