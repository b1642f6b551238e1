"""What training checks of its ``--data-path`` before any work starts: every dataset's files are there, its index is
whole and consistent with its ``.bin`` (``check_index``), and no token id lies outside the model's vocabulary (data
tokenized with another tokenizer would otherwise fail deep in the embedding, or train on its padding rows).

megatron-core's reader (``indexed_dataset._IndexReader``) trusts the index: a damaged one (bytes overwritten, two
files of different runs) gives negative or overlapping sequences, which train on garbage without an error. The index
layout it reads (little-endian): the magic (``MMIDIDX`` and two zero bytes), the version (u64, 1), the token dtype code
(u8, megatron-core's ``DType``), the sequence count N and the document count D (u64 each), then N int32 sequence
lengths, N int64 byte pointers into the ``.bin``, D int64 document indices (sequence numbers, 0 first and N last,
non-decreasing) and, for multimodal data only, N int8 modes. ``check_index`` checks every one of these, in chunks of
memory-mapped arrays (no copy of the index).

The largest token id comes from ``<prefix>.tokens.json`` (written by ``tools/preprocess_data.py`` and valid while the
``.bin`` keeps its size); datasets without it (other tools' output) are scanned once per start, memory-mapped in
chunks.
"""

from __future__ import annotations

import os
import struct
import warnings
from typing import List

import numpy as np

from aquila_npu.data.writer import read_token_stats
from aquila_npu.errors import DataError

_CHUNK = 1 << 26  # token ids per step of a scan
_INDEX_CHUNK = 1 << 22  # index entries per step of check_index
_MAGIC = b"MMIDIDX\x00\x00"
_FIXED = 34  # magic 9 + version 8 + dtype code 1 + sequence count 8 + document count 8
# megatron-core's DType codes (indexed_dataset.DType) and their sizes
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
           8: np.uint16}
_CHECKED: dict = {}  # prefix -> (inode, size, mtime) of its .idx and .bin when check_index last passed


def _bad(path: str, what: str) -> DataError:
    return DataError(f"--data-path: {path} {what}")


def _array(path: str, dtype, offset: int, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


def check_index(prefix: str) -> None:
    """``<prefix>.idx`` is a whole megatron-core index that describes ``<prefix>.bin`` exactly: magic, version,
    dtype code, sizes, sequence lengths >= 0, each sequence starting where the one before ends and the last ending at
    the end of the ``.bin``, document indices from 0 to the sequence count without going back. A DataError (one line
    naming the file and what is wrong) otherwise."""
    idx, bin_path = prefix + ".idx", prefix + ".bin"
    stamp = tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in (os.stat(idx), os.stat(bin_path)))
    if _CHECKED.get(prefix) == stamp:  # (check and check_documents_end_with both open each dataset)
        return
    _check_index(prefix, idx, bin_path)
    _CHECKED[prefix] = stamp


def _check_index(prefix: str, idx: str, bin_path: str) -> None:
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(_FIXED)
    if not head.startswith(_MAGIC) and not (len(head) < len(_MAGIC) and _MAGIC.startswith(head) and head):
        raise _bad(idx, "is not a megatron-core index (it does not start with MMIDIDX)")
    if len(head) < _FIXED:
        raise _bad(idx, f"is truncated: {size} bytes, shorter than the {_FIXED}-byte header")
    version, code, n, docs = struct.unpack("<QBQQ", head[len(_MAGIC):])
    if version != 1:
        raise _bad(idx, f"has version {version}; megatron-core's index is version 1 (damaged, or not an index)")
    if code not in _DTYPES:
        raise _bad(idx, f"has token dtype code {code}, which megatron-core does not know (1-8): the header is "
                        "damaged")
    itemsize = np.dtype(_DTYPES[code]).itemsize
    need = _FIXED + n * 4 + n * 8 + docs * 8
    if size < need:
        raise _bad(idx, f"is truncated: {size} bytes, its header ({n} sequences, {docs} document indices) needs "
                        f"{need}")
    if size not in (need, need + n):  # + n: the modes of multimodal data
        raise _bad(idx, f"has {size} bytes, its header ({n} sequences, {docs} document indices) describes {need}: "
                        "the header is damaged")
    lengths = _array(idx, np.int32, _FIXED, n)
    pointers = _array(idx, np.int64, _FIXED + n * 4, n)
    end = 0  # where the sequences so far end in the .bin
    for start in range(0, n, _INDEX_CHUNK):
        stop = min(start + _INDEX_CHUNK, n)
        chunk = np.asarray(lengths[start:stop], dtype=np.int64)
        negative = np.flatnonzero(chunk < 0)
        if negative.size:
            i = start + int(negative[0])
            raise _bad(idx, f"is damaged: sequence {i} has length {int(lengths[i])} (< 0)")
        ends = end + np.cumsum(chunk * itemsize)
        starts = np.concatenate(([end], ends[:-1]))
        wrong = np.flatnonzero(np.asarray(pointers[start:stop]) != starts)
        if wrong.size:
            i = start + int(wrong[0])
            raise _bad(idx, f"is damaged: sequence {i} starts at byte {int(pointers[i])} of the .bin, but the "
                            f"sequences before it end at byte {int(starts[wrong[0]])}")
        end = int(ends[-1])
    bin_size = os.path.getsize(bin_path)
    if bin_size < end:
        raise _bad(bin_path, f"is truncated: {bin_size} bytes, its index needs {end}")
    if bin_size > end:
        raise _bad(bin_path, f"has {bin_size} bytes, but its index describes {end}: the .bin and the .idx are not of "
                             "one run")
    if docs == 0:
        raise _bad(idx, "is damaged: it has no document indices (megatron-core writes at least the first, 0)")
    documents = _array(idx, np.int64, _FIXED + n * 12, docs)
    if int(documents[0]) != 0 or int(documents[-1]) != n:
        raise _bad(idx, f"is damaged: its document indices run from {int(documents[0])} to {int(documents[-1])}, "
                        f"not from 0 to its {n} sequences")
    previous = 0
    for start in range(0, docs, _INDEX_CHUNK):
        chunk = np.asarray(documents[start:start + _INDEX_CHUNK])
        back = np.flatnonzero(np.diff(chunk, prepend=previous) < 0)
        if back.size:
            i = start + int(back[0])
            raise _bad(idx, f"is damaged: document index {i} is {int(documents[i])}, below the one before it "
                            f"({int(documents[i - 1])})")
        previous = int(chunk[-1])


def _open(prefix: str):
    """megatron-core's IndexedDataset over ``prefix``, its index checked first (``check_index``); DataError naming
    the file when either is missing, cut short or damaged."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise DataError(f"--data-path: {prefix}{ext} not found (run tools/preprocess_data.py first)")
    check_index(prefix)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = IndexedDataset(prefix, mmap=True)
    except Exception as e:
        raise DataError(f"--data-path: {prefix}.idx is truncated or not a megatron-core index "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
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
