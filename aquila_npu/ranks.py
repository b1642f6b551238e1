"""Printing from several processes: ``print0`` prints on global rank 0 only (or when torch.distributed is not
running), ``print_first`` on the first process before torch.distributed exists (torchrun's RANK). Importing this
module imports nothing but the standard library."""

from __future__ import annotations

import os
import sys


def is_rank0() -> bool:
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None) if torch else None
    return dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0


def print0(*a, **kw) -> None:
    """print on global rank 0 only (or when torch.distributed is not running)."""
    if is_rank0():
        print(*a, **kw, flush=True)


def print_first(*a) -> None:
    """print on the first process before torch.distributed exists (torchrun's RANK)."""
    if os.environ.get("RANK", "0") == "0":
        print(*a, flush=True)
