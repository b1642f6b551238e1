"""FlagAI's first-generation Aquila folders (Aquila-7B, AquilaChat-7B, AquilaCode-7B-*) as the converter's input.

What FlagAI's ``AutoLoader`` reads (``flagai/model/base_model.py``: ``<model_dir>/<model_name>/config.json`` and
``pytorch_model.bin``, or the ``pytorch_model-0*.bin`` files it merges into one) and its trainer writes
(``flagai/utils.save_checkpoint``: ``<save_dir>/latest_iteration.txt`` naming ``<save_dir>/<iteration>/`` with
``config.json`` and ``pytorch_model.bin`` holding ``{"module": state dict, ...}``). Keys and shapes are checked against
the config before anything is written: a wrong key or shape is one line naming it. Model-parallel shards
(``pytorch_model_00.bin``, FlagAI's deepspeed+mpu runs) are refused: FlagAI merges them itself.
"""

from __future__ import annotations

import glob
import os
from typing import Dict, Optional, Tuple

import torch

from aquila_npu.checkpoint import safe_load
from aquila_npu.checkpoint.hf_io import HFReader
from aquila_npu.errors import CheckpointError
from aquila_npu.models.flagai_config import is_flagai_config, read_config, spec_from_flagai_config
from aquila_npu.weights.flagai import flagai_key, interleaved_to_halves, rotated
from aquila_npu.weights.mapping import hf_shapes

TRACKER = "latest_iteration.txt"  # FlagAI's trainer: "<iteration>\t<best iteration>"


def _iteration_folder(path: str) -> Optional[str]:
    """The folder FlagAI's trainer tracker in ``path`` names, else None."""
    tracker = os.path.join(path, TRACKER)
    if not os.path.isfile(tracker):
        return None
    try:
        with open(tracker, encoding="utf-8") as f:
            iteration = f.readline().split("\t")[0].strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{tracker}: cannot read ({e})") from None
    folder = os.path.join(path, iteration)
    if not iteration.isdigit() or not os.path.isdir(folder):
        raise CheckpointError(f"{tracker}: names iteration {iteration!r}, but {folder} is not a folder")
    return folder


def is_flagai_folder(path: str) -> bool:
    """A FlagAI first-generation model folder (its config.json has FlagAI's keys), or a FlagAI trainer's save folder."""
    if not os.path.isdir(path):
        return False
    folder = _iteration_folder(path) or path
    config = os.path.join(folder, "config.json")
    return os.path.isfile(config) and is_flagai_config(read_config(config))


def _weight_files(folder: str) -> list:
    single = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(single):
        return [single]
    parts = sorted(glob.glob(os.path.join(folder, "pytorch_model-*.bin")))
    if parts:
        return parts
    shards = sorted(glob.glob(os.path.join(folder, "pytorch_model_[0-9][0-9].bin")))
    if shards:
        raise CheckpointError(f"{shards[0]}: a model-parallel FlagAI shard (deepspeed+mpu); merge the shards with "
                              "FlagAI (model parallel size 1) and save pytorch_model.bin")
    raise CheckpointError(f"{folder}: no pytorch_model.bin (FlagAI's model file)")


class FlagAIReader:
    """A FlagAI first-generation folder read by Hugging Face tensor name (``get``), as ``hf_io.HFReader``: the
    converter's ``to_megatron`` / ``to_huggingface`` take either. Query and key rows come back in Hugging Face's
    rotate-half order (``weights.flagai``)."""

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise CheckpointError(f"--load-dir {path}: not a directory")
        self.path = _iteration_folder(path) or path
        name = os.path.basename(os.path.abspath(path))
        self.spec = spec_from_flagai_config(os.path.join(self.path, "config.json"), name=name)
        expected = {flagai_key(n): (n, shape) for n, shape in hf_shapes(self.spec).items()}
        self._tensors: Dict[str, Tuple[str, torch.Tensor]] = {}  # HF name -> (file, tensor)
        seen = set()
        for file in _weight_files(self.path):
            state = safe_load.load(file)
            if isinstance(state, dict) and isinstance(state.get("module"), dict):
                state = state["module"]  # FlagAI's trainer: {"module": state dict, "optimizer": ..., ...}
            if not isinstance(state, dict):
                raise CheckpointError(f"{file}: holds a {type(state).__name__}, not a state dict")
            for key, t in state.items():
                if key not in expected:
                    raise CheckpointError(f"{file}: {key!r} is not a key of FlagAI's Aquila model of this "
                                          f"config.json (e.g. {next(iter(expected))!r}, "
                                          f"'layers.0.attention.wq.weight')")
                hf_name, shape = expected[key]
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                    found = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise CheckpointError(f"{file}: {key} has shape {found}, the model of "
                                          f"{os.path.join(self.path, 'config.json')} needs {shape}")
                if key in seen:
                    raise CheckpointError(f"{file}: {key} is also in another pytorch_model file")
                seen.add(key)
                self._tensors[hf_name] = (file, t)
        missing = [k for k in expected if k not in seen]
        if missing:
            raise CheckpointError(f"{self.path}: FlagAI key {missing[0]!r} is missing"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        self.dtype = self._tensors["model.embed_tokens.weight"][1].dtype

    def get(self, name: str) -> torch.Tensor:
        """The Hugging Face tensor ``name`` (``wq`` / ``wk`` rows reordered to rotate-half)."""
        try:
            t = self._tensors[name][1]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name} is missing") from None
        return interleaved_to_halves(t, self.spec.num_attention_heads) if rotated(name) else t

    def release(self) -> None:
        """Nothing to unmap: the files are memory-mapped by ``safe_load`` and kept for the whole conversion."""


def open_hf_folder(path: str):
    """The converter's reader of ``--load-dir`` with ``--loader llama2_hf``: FlagAI's own layout when the folder is
    one (``is_flagai_folder``), else a Hugging Face folder."""
    return FlagAIReader(path) if is_flagai_folder(path) else HFReader(path)
