"""What ``--data-path`` names, checked before anything heavy is imported (the commands' input checks): its prefixes
and weights, and the megatron-core indexed files each prefix stands for. Standard library only."""

from __future__ import annotations

import os

from aquila_npu.errors import DataError


def parse_data_path(data_path):
    """(prefixes, weights or None) from ``--data-path``: a string or a list of strings, either ``"p1 p2 ..."`` or
    Megatron's weighted form ``"w1 p1 w2 p2 ..."`` (weights are normalised by megatron-core)."""
    items = data_path.split() if isinstance(data_path, str) else [w for item in data_path for w in str(item).split()]
    if not items:
        raise DataError("--data-path is empty")
    if len(items) % 2 == 0:
        try:
            weights = [float(w) for w in items[0::2]]
        except ValueError:
            weights = None
        if weights is not None:
            if any(w < 0 for w in weights) or sum(weights) <= 0:
                raise DataError(f"--data-path: weights must be non-negative and not all zero: {weights}")
            return list(items[1::2]), weights
    return list(items), None


def check_prefix(prefix, what="--data-path"):
    """``prefix.bin`` and ``prefix.idx`` exist."""
    missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
    if missing:
        raise DataError(f"{what}: {' and '.join(missing)} not found (run tools/preprocess_data.py first)")


def instruction_prefix(data_prefix):
    """The packed-file base for a ``--data-path`` entry: ``alpaca`` -> ``alpaca_packed`` (ModelLink's naming); a
    prefix already ending in ``_packed`` is kept."""
    for base in (data_prefix + "_packed", data_prefix):
        if os.path.isfile(f"{base}_input_ids_document.idx"):
            return base
    raise DataError(f"--data-path: {data_prefix}_packed_input_ids_document.idx not found (instruction data is "
                    "written by tools/preprocess_data.py --handler-name GeneralInstructionHandler)")


def indexed_prefixes(data_path, instruction=False):
    """The megatron-core indexed datasets ``--data-path`` names: its prefixes, or for instruction data the input ids
    and labels of each packed prefix."""
    prefixes, _ = parse_data_path(data_path)
    if not instruction:
        return prefixes
    return [f"{instruction_prefix(p)}_{key}_document" for p in prefixes for key in ("input_ids", "labels")]


def check_data_path(data_path, instruction=False) -> None:
    """Every indexed dataset ``--data-path`` names exists (both files of each; the input ids and labels of
    instruction data); one DataError line naming the first missing file."""
    for prefix in indexed_prefixes(data_path, instruction):
        check_prefix(prefix)
