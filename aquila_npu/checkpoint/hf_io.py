"""Hugging Face checkpoint folders: read tensor by tensor (mmap), write safetensors shards."""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from aquila_npu.models.hf_config import spec_from_hf_config
from aquila_npu.models.registry import ModelSpec
from aquila_npu.weights.mapping import IGNORED_HF_SUFFIXES

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "generation_config.json")


class CheckpointError(ValueError):
    """Missing, corrupt or inconsistent checkpoint files."""


class HFReader:
    """Tensors of a HF folder by name: model.safetensors, sharded safetensors with model.safetensors.index.json, or
    legacy pytorch_model*.bin. Each tensor is read on demand (memory-mapped), never the whole model at once."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isdir(path):
            raise CheckpointError(f"--load-dir {path}: not a directory")
        self.spec: ModelSpec = spec_from_hf_config(path)
        self._where: Dict[str, str] = {}
        self._handles = {}
        self._bin_cache: Tuple[Optional[str], Optional[dict]] = (None, None)
        st_index = os.path.join(path, "model.safetensors.index.json")
        bin_index = os.path.join(path, "pytorch_model.bin.index.json")
        if os.path.exists(st_index) or os.path.exists(bin_index):
            index = st_index if os.path.exists(st_index) else bin_index
            try:
                with open(index) as f:
                    self._where = dict(json.load(f)["weight_map"])
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid index ({e})") from None
        else:
            files = [f for f in ("model.safetensors", "pytorch_model.bin") if os.path.exists(os.path.join(path, f))]
            if not files:
                raise CheckpointError(f"{path}: no model.safetensors, model.safetensors.index.json or "
                                      "pytorch_model*.bin")
            for name in self._keys_of(files[0]):
                self._where[name] = files[0]
        for f in set(self._where.values()):
            if not os.path.exists(os.path.join(path, f)):
                raise CheckpointError(f"{path}: index names {f}, which is missing")
        self._where = {k: v for k, v in self._where.items() if not k.endswith(IGNORED_HF_SUFFIXES)}

    def _keys_of(self, fname: str) -> List[str]:
        if fname.endswith(".safetensors"):
            return list(self._open(fname).keys())
        return list(self._load_bin(fname).keys())

    def _open(self, fname: str):
        if fname not in self._handles:
            from safetensors import safe_open
            try:
                self._handles[fname] = safe_open(os.path.join(self.path, fname), framework="pt")
            except Exception as e:
                raise CheckpointError(f"{os.path.join(self.path, fname)}: cannot read safetensors ({e})") from None
        return self._handles[fname]

    def _load_bin(self, fname: str) -> dict:
        if self._bin_cache[0] != fname:
            try:
                sd = torch.load(os.path.join(self.path, fname), map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:
                raise CheckpointError(f"{os.path.join(self.path, fname)}: cannot read ({e})") from None
            self._bin_cache = (fname, sd)
        return self._bin_cache[1]

    def get_slice(self, name: str):
        """A lazy view for safetensors (only the indexed part is read); the (mmapped) tensor for .bin files."""
        fname = self._where.get(name)
        if fname is not None and fname.endswith(".safetensors"):
            return self._open(fname).get_slice(name)
        return self.get(name)

    def get(self, name: str) -> Tensor:
        fname = self._where.get(name)
        if fname is None:
            raise CheckpointError(f"{self.path}: tensor {name} is missing")
        try:
            if fname.endswith(".safetensors"):
                return self._open(fname).get_tensor(name)
            return self._load_bin(fname)[name]
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{os.path.join(self.path, fname)}: cannot read {name} ({e})") from None


class HFWriter:
    """Writes safetensors shards of at most ``max_shard_bytes`` and the index, as transformers does."""

    def __init__(self, path: str, max_shard_bytes: int = 5 * 1024 ** 3):
        self.path = path
        self.max = max_shard_bytes
        self.pending: Dict[str, Tensor] = {}
        self.pending_bytes = 0
        self.weight_map: Dict[str, str] = {}
        self.files: List[str] = []
        self.total = 0

    def add(self, name: str, t: Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + n > self.max:
            self._flush()
        self.pending[name] = t.contiguous()
        self.pending_bytes += n
        self.total += n

    def _flush(self) -> None:
        from safetensors.torch import save_file
        fname = f"model-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, os.path.join(self.path, fname), metadata={"format": "pt"})
        self.files.append(fname)
        for k in self.pending:
            self.weight_map[k] = fname
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        n = len(self.files)
        if n == 1:
            os.replace(os.path.join(self.path, self.files[0]), os.path.join(self.path, "model.safetensors"))
            return
        renames = {f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, f in enumerate(self.files)}
        for old, new in renames.items():
            os.replace(os.path.join(self.path, old), os.path.join(self.path, new))
        index = {"metadata": {"total_size": self.total},
                 "weight_map": {k: renames[v] for k, v in sorted(self.weight_map.items())}}
        with open(os.path.join(self.path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)


def copy_tokenizer_files(src: str, dst: str) -> List[str]:
    copied = []
    for f in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, f)):
            shutil.copy2(os.path.join(src, f), os.path.join(dst, f))
            copied.append(f)
    return copied


def write_config(spec: ModelSpec, dst: str, dtype: torch.dtype, base: Optional[dict] = None) -> None:
    """config.json: the original one (when given) with our architecture fields, so nothing of it is lost."""
    cfg = dict(base or {})
    cfg.update(spec.to_hf_config() if not base else {})
    cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
