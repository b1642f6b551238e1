"""Reading a checkpoint file never runs code: every ``.pt`` file is read with ``torch.load(weights_only=True)``.

``weights_only`` rebuilds tensors, torch dtypes / devices / sizes and plain containers (dict, list, tuple, str,
numbers, None) and nothing else. The one class added here is ``argparse.Namespace``: Megatron-LM stores its flags in
every checkpoint as ``args`` (a Namespace), and a Namespace is rebuilt by filling its ``__dict__``, with no method
of it called and its values themselves limited to what weights_only allows. What we write needs nothing more: RNG
states are stored as tensors and numbers (``aquila_npu.training.checkpointing``), the parsed flags as a dict.

A file that needs anything else (a pickled function, another class: how a hostile checkpoint runs code, or numpy
arrays, as checkpoints written before this check held) is refused with one line naming the file.
"""

from __future__ import annotations

import argparse
import pickle
import re

import torch

from aquila_npu.errors import CheckpointError

ALLOWED_CLASSES = (argparse.Namespace,)


def load(path: str, *, mmap: bool = True):
    """The object in the torch file ``path`` (CPU tensors, memory-mapped when ``mmap``); CheckpointError (one line
    naming the file) when it is missing, unreadable, or needs anything beyond tensors, plain containers and
    ``ALLOWED_CLASSES``."""
    try:
        with torch.serialization.safe_globals(list(ALLOWED_CLASSES)):
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"missing checkpoint file {path}") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused: it needs {_needs(e)}, which is not on the allow-list (tensors, "
                              "plain containers, argparse.Namespace): loading it could run code") from None
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None


def _needs(err: pickle.UnpicklingError) -> str:
    """What the refused file asks for, from torch's message (e.g. ``posix.system``)."""
    found = re.search(r"GLOBAL (\S+)", str(err))
    if found:
        return found.group(1)
    lines = [ln for ln in str(err).splitlines() if ln.strip() and not ln.startswith("Weights only load failed")]
    return lines[0][:200] if lines else "an object weights_only cannot rebuild"
