"""Hugging Face checkpoint folders: read tensor by tensor (mmap), write safetensors shards."""

from __future__ import annotations

import json
import mmap
import os
import shutil
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from aquila_npu.checkpoint import safe_load
from aquila_npu.errors import CheckpointError
from aquila_npu.models.dtypes import dtype_name
from aquila_npu.models.hf_config import spec_from_hf_config
from aquila_npu.models.registry import ModelSpec
from aquila_npu.outputs.atomic import writing
from aquila_npu.weights.mapping import IGNORED_HF_SUFFIXES

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "generation_config.json")


_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}


class SafetensorsFile:
    """A safetensors file memory-mapped once; ``tensor(name)`` is a zero-copy view of the file, so slicing it and
    copying the slice reads only the bytes needed. The mapping goes when the last view of it does."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors ({e})") from None
        size = len(self._map)
        n = int.from_bytes(self._map[:8], "little") if size >= 8 else -1
        if n < 2 or 8 + n > size:
            raise CheckpointError(f"{path}: not a safetensors file (bad header length; truncated or corrupt?)")
        try:
            header = json.loads(bytes(self._map[8:8 + n]))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
        header.pop("__metadata__", None)
        self._base = 8 + n
        self._entries: Dict[str, tuple] = {}
        for name, e in header.items():
            try:
                dtype = _TORCH_DTYPES[e["dtype"]]
                begin, end = e["data_offsets"]
                shape = tuple(e["shape"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: corrupt safetensors header entry for {name}") from None
            count = int(torch.Size(shape).numel())
            if end - begin != count * (torch.finfo(dtype).bits if dtype.is_floating_point else
                                       torch.iinfo(dtype).bits if dtype != torch.bool else 8) // 8 \
                    or self._base + end > size:
                raise CheckpointError(f"{path}: {name} lies outside the file or has the wrong size (truncated?)")
            self._entries[name] = (dtype, shape, begin, count)

    def keys(self) -> List[str]:
        return list(self._entries)

    def tensor(self, name: str) -> Tensor:
        dtype, shape, begin, count = self._entries[name]
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():  # the view is read-only: only ever copied from
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(self._map, dtype=dtype, count=count, offset=self._base + begin).view(shape)


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

    def _open(self, fname: str) -> SafetensorsFile:
        if fname not in self._handles:
            self._handles[fname] = SafetensorsFile(os.path.join(self.path, fname))
        return self._handles[fname]

    def _load_bin(self, fname: str) -> dict:
        if self._bin_cache[0] != fname:
            self._bin_cache = (fname, safe_load.load(os.path.join(self.path, fname)))
        return self._bin_cache[1]

    def release(self) -> None:
        """Unmap the files read so far (their pages stay in the page cache, but leave this process's RSS)."""
        self._handles = {}
        self._bin_cache = (None, None)

    def get(self, name: str) -> Tensor:
        """The tensor as a memory-mapped view (safetensors, .bin): indexing and copying a part reads only that part."""
        fname = self._where.get(name)
        if fname is None:
            raise CheckpointError(f"{self.path}: tensor {name} is missing")
        try:
            if fname.endswith(".safetensors"):
                return self._open(fname).tensor(name)
            return self._load_bin(fname)[name]
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{os.path.join(self.path, fname)}: cannot read {name} ({e})") from None


def reference_weights(path: str) -> bool:
    """Before transformers' ``from_pretrained`` reads the HF folder ``path`` (the selfcheck's reference model):
    True when it holds safetensors (then load with ``use_safetensors=True``: no pickle is read at all); else every
    ``pytorch_model*.bin`` is read once through ``safe_load`` (memory-mapped, the allow-list), so a file that asks
    for anything beyond tensors is refused in one line naming it before transformers unpickles it. False: load the
    .bin files (transformers reads them with ``weights_only=True`` too)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    names = sorted(os.listdir(path))
    if any(n.endswith(".safetensors") for n in names):
        return True
    pickles = [n for n in names if n.startswith("pytorch_model") and n.endswith(".bin")]
    if not pickles:
        raise CheckpointError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model*.bin")
    for n in pickles:
        safe_load.load(os.path.join(path, n))
    return False


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


class HFWriter:
    """Streams tensors into safetensors shards of at most ``max_shard_bytes`` (plus the index, as transformers
    writes it). The shard plan and each file's header come from the known names and shapes, so every tensor is
    written to its place as soon as it arrives and the writer holds none of them."""

    def __init__(self, path: str, shapes: Dict[str, Tuple[int, ...]], dtype: torch.dtype,
                 max_shard_bytes: int = 5 * 1024 ** 3):
        self.path, self.dtype, self.shapes = path, dtype, shapes
        size = torch.finfo(dtype).bits // 8
        nbytes = {k: size * int(torch.Size(s).numel()) for k, s in shapes.items()}
        shards: List[List[str]] = [[]]
        used = 0
        for name in shapes:
            if shards[-1] and used + nbytes[name] > max_shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append(name)
            used += nbytes[name]
        n = len(shards)
        self.files = ["model.safetensors"] if n == 1 else \
            [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.total = sum(nbytes.values())
        self._place: Dict[str, Tuple[int, int, int]] = {}  # name -> (file index, absolute offset, bytes)
        self._headers: List[bytes] = []
        for fi, names in enumerate(shards):
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name in names:
                header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shapes[name]),
                                "data_offsets": [offset, offset + nbytes[name]]}
                offset += nbytes[name]
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
            self._headers.append(len(raw).to_bytes(8, "little") + raw)
            base = len(self._headers[-1])
            for name in names:
                begin, end = header[name]["data_offsets"]
                self._place[name] = (fi, base + begin, end - begin)
        self._fds: Dict[int, int] = {}
        self._written: set = set()

    def add(self, name: str, t: Tensor) -> None:
        if name not in self._place:
            raise CheckpointError(f"HF writer: unexpected tensor {name}")
        if tuple(t.shape) != tuple(self.shapes[name]) or t.dtype != self.dtype:
            raise CheckpointError(f"HF writer: {name} is {tuple(t.shape)} {t.dtype}, expected "
                                  f"{tuple(self.shapes[name])} {self.dtype}")
        fi, offset, n = self._place[name]
        path = os.path.join(self.path, self.files[fi])
        with writing(path, f"safetensors shard ({name})"):
            if fi not in self._fds:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds[fi] = fd
                os.pwrite(fd, self._headers[fi], 0)
            data = memoryview(t.detach().contiguous().view(torch.uint8).reshape(-1).numpy())
            while len(data):
                done = os.pwrite(self._fds[fi], data, offset)
                data, offset = data[done:], offset + done
        self._written.add(name)

    def abort(self) -> None:
        """Close the files after a failure (the caller removes them)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def close(self) -> None:
        for fi, fd in self._fds.items():
            with writing(os.path.join(self.path, self.files[fi]), "safetensors shard"):
                os.close(fd)
        self._fds = {}
        missing = [k for k in self.shapes if k not in self._written]
        if missing:
            raise CheckpointError(f"HF writer: {len(missing)} tensors never written, e.g. {missing[0]}")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {k: self.files[fi] for k, (fi, _, _) in sorted(self._place.items())}}
            path = os.path.join(self.path, "model.safetensors.index.json")
            with writing(path, "the shard index"), open(path, "w") as f:
                json.dump(index, f, indent=2)


def copy_tokenizer_files(src: str, dst: str) -> List[str]:
    copied = []
    for f in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, f)):
            with writing(os.path.join(dst, f), "a tokenizer file"):
                shutil.copy2(os.path.join(src, f), os.path.join(dst, f))
            copied.append(f)
    return copied


def write_config(spec: ModelSpec, dst: str, dtype: torch.dtype, base: Optional[dict] = None) -> None:
    """config.json: the original one (when given) with our architecture fields, so nothing of it is lost."""
    cfg = dict(base or {})
    cfg.update(spec.to_hf_config() if not base else {})
    cfg["torch_dtype"] = dtype_name(dtype)
    path = os.path.join(dst, "config.json")
    with writing(path, "config.json"), open(path, "w") as f:
        json.dump(cfg, f, indent=2)
