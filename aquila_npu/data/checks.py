"""What training checks of its ``--data-path`` before any work starts: every dataset's files are there, neither is
truncated, and no token id lies outside the model's vocabulary (data tokenized with another tokenizer would
otherwise fail deep in the embedding, or train on its padding rows).

The largest token id comes from ``<prefix>.tokens.json`` (written by ``tools/preprocess_data.py`` and valid while the
``.bin`` keeps its size); datasets without it (other tools' output) are scanned once per start, memory-mapped in
chunks.
"""

from __future__ import annotations

import os
import warnings
from typing import List

import numpy as np

from aquila_npu.data.writer import read_token_stats
from aquila_npu.errors import DataError

_CHUNK = 1 << 26  # token ids per step of a scan


def _open(prefix: str):
    """megatron-core's IndexedDataset over ``prefix``; DataError naming the file when either is cut short."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise DataError(f"--data-path: {prefix}{ext} not found (run tools/preprocess_data.py first)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = IndexedDataset(prefix, mmap=True)
    except Exception as e:
        raise DataError(f"--data-path: {prefix}.idx is truncated or not a megatron-core index "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    index = ds.index
    if index.sequence_count:
        needed = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size
        size = os.path.getsize(prefix + ".bin")
        if size < needed:
            raise DataError(f"--data-path: {prefix}.bin is truncated: {size} bytes, its index needs {needed}")
    return ds


def max_token_id(prefix: str) -> int:
    """The largest token id in ``prefix``'s documents (-1 when it holds none)."""
    ds = _open(prefix)
    stats = read_token_stats(prefix)
    if stats is not None:
        return int(stats["max_token_id"])
    index = ds.index
    if not index.sequence_count:
        return -1
    tokens = np.memmap(prefix + ".bin", dtype=index.dtype, mode="r")
    end = (int(index.sequence_pointers[-1]) // index.dtype_size) + int(index.sequence_lengths[-1])
    return max(int(tokens[i:min(i + _CHUNK, end)].max()) for i in range(0, end, _CHUNK)) if end else -1


def check(prefixes: List[str], vocab_size: int) -> None:
    """Each indexed-dataset prefix: present, complete, and its token ids below ``vocab_size``."""
    for prefix in prefixes:
        top = max_token_id(prefix)
        if top >= vocab_size:
            raise DataError(f"--data-path: {prefix}.bin holds token id {top}, outside the model's vocabulary of "
                            f"{vocab_size} ids: the data was tokenized with another (larger) tokenizer")


def check_documents_end_with(prefixes: List[str], eod: int, flag: str, sample: int = 64) -> None:
    """Each prefix's first ``sample`` documents end with the EOD token (``tools/preprocess_data.py --append-eod``),
    which ``flag`` splits the documents of a sequence at."""
    for prefix in prefixes:
        ds = _open(prefix)
        n = min(sample, len(ds))
        if n and not all(int(ds[i][-1]) == eod for i in range(n) if ds.index.sequence_lengths[i]):
            raise DataError(f"{flag}: {prefix}'s documents do not end with the end-of-document token (id {eod}), so "
                            "their boundaries are unknown: preprocess the data with --append-eod")
