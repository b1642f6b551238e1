"""What the inference commands' model flags resolve to (``ModelOptions``) and the checks of their input that need
no model. Importing this module imports neither torch nor megatron-core: ``--help`` and input errors of generate and
evaluate come before either is imported (``aquila_npu.inference.session`` loads the model)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, Optional

from aquila_npu.device.fused import FusedOps
from aquila_npu.errors import UsageError


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


def check_load_dir(path: str) -> None:
    """``--load`` must be a directory (the converter writes one)."""
    if not os.path.isdir(path):
        raise UsageError(f"--load {path}: no such directory (convert a Hugging Face model first with "
                         "tools/checkpoint/convert_ckpt.py)")
