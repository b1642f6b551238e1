"""Write megatron-core indexed datasets (``<prefix>.bin`` / ``<prefix>.idx``) with its own ``IndexedDatasetBuilder``.

All files are written under temporary names (``<final name>.tmp-<pid>``) and renamed into place only when every
dataset of the run has been finalized; on any error (or Ctrl-C) the temporary files are removed, so a failed run
leaves no ``.bin`` / ``.idx`` behind, and an earlier run's output is only replaced by a complete new one.
"""

import os
import warnings

import numpy as np


def _mcore_indexed_dataset():
    with warnings.catch_warnings():  # megatron.core's package import warns about optional Apex / Transformer Engine
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def token_dtype(vocab_size):
    """megatron-core's choice for token ids: uint16 below 65500 ids, int32 above (Aquila2's 100008 ids: int32)."""
    return _mcore_indexed_dataset().DType.optimal_dtype(vocab_size)


class IndexedDatasetsWriter:
    """Several indexed datasets written side by side: ``prefixes`` maps a name to (final path prefix, numpy dtype).

    Use as a context manager: ``add(name, flat, lengths)`` appends documents; leaving the block normally calls
    ``commit()``, leaving it with an exception calls ``abort()``.
    """

    def __init__(self, prefixes):
        builder_cls = _mcore_indexed_dataset().IndexedDatasetBuilder
        self.prefixes = dict(prefixes)
        self.tag = f".tmp-{os.getpid()}"
        self.builders, self.documents = {}, {name: 0 for name in self.prefixes}
        try:
            for name, (prefix, dtype) in self.prefixes.items():
                self.builders[name] = builder_cls(self._tmp(prefix, ".bin"), dtype=dtype)
        except BaseException:
            self.abort()
            raise

    def _tmp(self, prefix, ext):
        return prefix + ext + self.tag

    def add(self, name, flat, lengths):
        """Append documents: ``flat`` holds their tokens end to end, ``lengths`` their sizes."""
        builder = self.builders[name]
        dtype = builder.dtype
        if len(flat) and np.issubdtype(dtype, np.unsignedinteger) and not (
                0 <= flat.min() and flat.max() <= np.iinfo(dtype).max):
            raise ValueError(f"token id out of range for {np.dtype(dtype).name} in {self.prefixes[name][0]}")
        start = 0
        for n in lengths.tolist():
            builder.add_document(flat[start:start + n], [n])
            start += n
        self.documents[name] += len(lengths)

    def commit(self):
        """Finalize every dataset under its temporary names, then rename all of them into place."""
        for name, (prefix, _) in self.prefixes.items():
            self.builders[name].finalize(self._tmp(prefix, ".idx"))
        for prefix, _ in self.prefixes.values():
            for ext in (".bin", ".idx"):
                os.replace(self._tmp(prefix, ext), prefix + ext)
        self.builders = {}

    def abort(self):
        """Close and delete every temporary file."""
        for builder in self.builders.values():
            try:
                builder.data_file.close()
            except Exception:
                pass
        self.builders = {}
        for prefix, _ in self.prefixes.values():
            for ext in (".bin", ".idx"):
                try:
                    os.remove(self._tmp(prefix, ext))
                except FileNotFoundError:
                    pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()
        return False
