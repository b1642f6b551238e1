"""What a directory holds, for checks that an output is absent, untouched or complete after a fault (tests and
benchmarks/fault_trials.py): the digest of every file, and the hidden entries (staging, temporary, aside copies,
locks) a run leaves beside its outputs."""

from __future__ import annotations

import hashlib
import os
from typing import Dict, List, Optional


def digest(path) -> Optional[Dict[str, str]]:
    """{relative path: sha256} of every file under ``path`` (None when it does not exist)."""
    if not os.path.exists(path):
        return None
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def hidden(directory) -> List[str]:
    """The hidden entries of ``directory`` (what a run leaves beside its outputs has a hidden name)."""
    return sorted(e for e in os.listdir(directory) if e.startswith(".")) if os.path.isdir(directory) else []
