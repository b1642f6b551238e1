"""The journal of every change compat made at run time (attributes of other libraries' modules and classes, and
environment variables their runtimes read), so that ``undo_all()`` restores the originals, newest first (tests use
it). Changes are grouped by name (``applied()``: the groups installed now) so that each install is idempotent.

Importing this module imports nothing but the standard library.
"""

from __future__ import annotations

import os
from typing import Any, List, Set, Tuple

_applied: List[Tuple[Any, str, Any]] = []
_groups: Set[str] = set()
_UNSET = object()


def set_attr(owner: Any, name: str, value: Any) -> None:
    """``setattr(owner, name, value)``, undoably."""
    _applied.append((owner, name, getattr(owner, name)))
    setattr(owner, name, value)


def set_env(name: str, value: str) -> None:
    """Set an environment variable a device runtime reads, unless the user set it, undoably."""
    if name not in os.environ:
        _applied.append((os.environ, name, _UNSET))
        os.environ[name] = value


def done(group: str) -> bool:
    return group in _groups


def mark(group: str) -> None:
    _groups.add(group)


def applied() -> Set[str]:
    """Names of the groups of changes installed now."""
    return set(_groups)


def undo_all() -> None:
    """Restore every changed attribute and environment variable, newest first."""
    while _applied:
        owner, name, old = _applied.pop()
        if owner is os.environ:
            os.environ.pop(name, None)
        else:
            setattr(owner, name, old)
    _groups.clear()
