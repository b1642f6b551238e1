"""Putting megatron-core state dicts into a built model stage."""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import Tensor


def load_stage_state(model: torch.nn.Module, state: Dict[str, Tensor],
                     optional: Optional[Callable[[str], bool]] = None) -> None:
    """Load one stage's weights; every parameter must be provided (``_extra_state`` buffers excepted, and the keys
    ``optional`` accepts: a LoRA model's adapters when its base is loaded)."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state") and not (optional and optional(k))]
    if missing or result.unexpected_keys:
        raise KeyError(f"state dict does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}"
                       f", unexpected {result.unexpected_keys[:5]}")
