"""Crash points: the hook through which tests prove that a crash leaves no half-written output.

Every writer of training checkpoints (``training.checkpointing.save``), conversions (``checkpoint.convert``) and
directory replacements (``outputs.atomic``) calls ``point(name)`` at the named steps below. It does nothing unless the
environment variable ``AQUILA_FAULT`` names that step; then the process dies at once by SIGKILL, as from ``kill -9``
or a node failure (no cleanup, no ``finally``). tests/test_faults.py switches each point on in a child process and
checks that an earlier complete output survives and that the next run removes the debris. Never set ``AQUILA_FAULT``
outside tests. A new writer gets the same points, and tests/test_faults.py a case for each.

Steps (``POINTS``): ``before-data`` (staging directory made, nothing written), ``mid-file`` (the first file cut to
half its length, as a write cut short), ``before-rename`` (all files written, not yet in place), ``between-renames``
(the new output in place, the old one not yet removed), ``before-tracker`` (a training checkpoint in place, the
tracker file not yet pointing at it).
"""

from __future__ import annotations

import os
import signal
from typing import Optional

ENV = "AQUILA_FAULT"
POINTS = ("before-data", "mid-file", "before-rename", "between-renames", "before-tracker")


def point(name: str, partial: Optional[str] = None) -> None:
    """Die here when ``AQUILA_FAULT`` is ``name`` (after cutting the file ``partial`` to half its size)."""
    if os.environ.get(ENV) != name:
        return
    if partial is not None:
        os.truncate(partial, os.path.getsize(partial) // 2)
    os.kill(os.getpid(), signal.SIGKILL)
