"""Write megatron-core indexed datasets (``<prefix>.bin`` / ``<prefix>.idx``) with its own ``IndexedDatasetBuilder``,
plus ``<prefix>.tokens.json`` (the largest token id and the .bin size: training checks its vocabulary against it
without reading the .bin, ``aquila_npu.data.checks``).

The output is claimed for the run (``aquila_npu.outputs.owner``: a lock beside it, stale temporary files of killed
runs removed), every file is written under a temporary name (``.<final name>.tmp.pid<PID>@<HOST>``) and renamed into
place only when every dataset of the run has been finalized; on any error (or Ctrl-C) the temporary files are
removed, so a failed run leaves no ``.bin`` / ``.idx`` behind, and an earlier run's output is only replaced by a
complete new one. A write error (a full disk) ends in one line naming the file.
"""

import json
import os
import warnings

import numpy as np

from aquila_npu.errors import OutputError
from aquila_npu.outputs import owner
from aquila_npu.outputs.atomic import writing

EXTENSIONS = (".bin", ".idx", ".tokens.json")


def read_token_stats(prefix):
    """``<prefix>.tokens.json`` as written here, or None when absent, unreadable or not of this ``.bin``."""
    try:
        with open(prefix + ".tokens.json") as f:
            stats = json.load(f)
        if stats["bin_bytes"] == os.path.getsize(prefix + ".bin"):
            return stats
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _mcore_indexed_dataset():
    with warnings.catch_warnings():  # megatron.core's package import warns about optional Apex / Transformer Engine
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def token_dtype(vocab_size):
    """megatron-core's choice for token ids: uint16 below 65500 ids, int32 above (Aquila2's 100008 ids: int32)."""
    return _mcore_indexed_dataset().DType.optimal_dtype(vocab_size)


class IndexedDatasetsWriter:
    """Several indexed datasets written side by side: ``prefixes`` maps a name to (final path prefix, numpy dtype);
    ``target`` is the run's output prefix (locked for the run, named in messages).

    Use as a context manager: ``add(name, flat, lengths)`` appends documents; leaving the block normally calls
    ``commit()``, leaving it with an exception calls ``abort()``.
    """

    def __init__(self, prefixes, target):
        builder_cls = _mcore_indexed_dataset().IndexedDatasetBuilder
        self.prefixes = dict(prefixes)
        self.target = target
        self.builders, self.documents = {}, {name: 0 for name in self.prefixes}
        self.max_id = {name: -1 for name in self.prefixes}
        names = {os.path.basename(p) + ext for p, _ in self.prefixes.values() for ext in EXTENSIONS}
        self.lock = owner.claim(target, "--output-prefix",
                                debris_dir=owner.resolve(os.path.dirname(os.path.abspath(target))), targets=names)
        try:
            for name, (prefix, dtype) in self.prefixes.items():
                with writing(prefix + ".bin", "the tokenized documents"):
                    self.builders[name] = builder_cls(self._tmp(prefix, ".bin"), dtype=dtype)
        except BaseException:
            self.abort()
            self.close()
            raise

    def _tmp(self, prefix, ext):
        return os.path.join(os.path.dirname(prefix), owner.debris_name(os.path.basename(prefix) + ext, "tmp"))

    def add(self, name, flat, lengths):
        """Append documents: ``flat`` holds their tokens end to end, ``lengths`` their sizes."""
        builder = self.builders[name]
        dtype = builder.dtype
        if len(flat) and np.issubdtype(dtype, np.unsignedinteger) and not (
                0 <= flat.min() and flat.max() <= np.iinfo(dtype).max):
            raise ValueError(f"token id out of range for {np.dtype(dtype).name} in {self.prefixes[name][0]}")
        if len(flat):
            self.max_id[name] = max(self.max_id[name], int(flat.max()))
        start = 0
        with writing(self.prefixes[name][0] + ".bin", "the tokenized documents"):
            for n in lengths.tolist():
                builder.add_document(flat[start:start + n], [n])
                start += n
        self.documents[name] += len(lengths)

    def commit(self):
        """Finalize every dataset under its temporary names, then rename all of them into place."""
        for name, (prefix, _) in self.prefixes.items():
            with writing(prefix + ".bin/.idx", "the end of the documents and their index"):
                self.builders[name].finalize(self._tmp(prefix, ".idx"))
            stats = {"max_token_id": self.max_id[name], "bin_bytes": os.path.getsize(self._tmp(prefix, ".bin")),
                     "documents": self.documents[name]}
            with writing(prefix + ".tokens.json", "the token statistics"), \
                    open(self._tmp(prefix, ".tokens.json"), "w") as f:
                json.dump(stats, f)
        for prefix, _ in self.prefixes.values():
            for ext in EXTENSIONS:
                with writing(prefix + ext, "the dataset"):
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
            for ext in EXTENSIONS:
                try:
                    os.remove(self._tmp(prefix, ext))
                except FileNotFoundError:
                    pass

    def close(self):
        self.lock.release()

    def __enter__(self):
        return self

    def _removed(self, err):
        return OutputError(f"{err}; the partial output was removed, earlier output at {self.target}* left as it was")

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                try:
                    self.commit()
                except BaseException:
                    self.abort()
                    raise
            else:
                self.abort()
        except OutputError as e:
            raise self._removed(e) from None
        finally:
            self.close()
        if isinstance(exc, OutputError):
            raise self._removed(exc) from None
        return False
