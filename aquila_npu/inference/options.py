"""What the inference commands' flags resolve to (``ModelOptions``, ``SamplingParams``) and the checks of their input
that need no model. Importing this module imports neither torch nor megatron-core: ``--help`` and input errors of
generate and evaluate come before either is imported (``aquila_npu.inference.session`` loads the model)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Optional

from aquila_npu.device.fused import FusedOps
from aquila_npu.errors import UsageError

if TYPE_CHECKING:  # annotations only
    import torch


@dataclass(frozen=True)
class ModelOptions:
    """What to load and where to run it (the inference commands' model flags, resolved)."""

    load: str
    tokenizer: str
    use_fast: bool = True
    tokenizer_type: str = "PretrainedFromHF"
    tp: Optional[int] = None  # default: the checkpoint's (and it must be the checkpoint's)
    pp: Optional[int] = None
    device: str = "auto"
    params_dtype: Optional[torch.dtype] = None  # default: the checkpoint's
    fused: FusedOps = FusedOps()
    architecture: Mapping[str, object] = field(default_factory=dict)  # given architecture flags, checked
    seq_length: Optional[int] = None  # longest sequence to run (capped at the model's positions)


@dataclass(frozen=True)
class SamplingParams:
    """``greedy``: argmax. Otherwise logits / temperature, keep the top_k (0 = all), then the smallest set of tokens
    whose probability reaches top_p (1.0 = all), and draw one (Hugging Face's order of the three warpers)."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 1234

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature {self.temperature} must be > 0 (use greedy decoding for 0)")
        if self.top_k < 0:
            raise ValueError(f"top_k {self.top_k} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p {self.top_p} must be in (0, 1]")


def check_load_dir(path: str) -> None:
    """``--load`` must be a directory (the converter writes one)."""
    if not os.path.isdir(path):
        raise UsageError(f"--load {path}: no such directory (convert a Hugging Face model first with "
                         "tools/checkpoint/convert_ckpt.py)")
