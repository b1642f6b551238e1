"""Single output files (results, reports, generations) written so that a reader never sees half of one: the content
goes to ``.<name>.tmp.pid<PID>@<HOST>`` beside the target, is flushed to disk and renamed over it. A write error
(a full disk, a folder that is not there) is one ``OutputError`` line naming the file; the temporary file is removed
and an earlier output left as it was."""

from __future__ import annotations

import contextlib
import json
import os
from typing import IO, Any, Iterator

from aquila_npu.errors import OutputError
from aquila_npu.outputs import owner
from aquila_npu.outputs.atomic import reason


def check_target(flag: str, path: str) -> None:
    """Before any work: ``path`` can become a file (not a folder; its folder is created when missing)."""
    if os.path.isdir(path):
        raise OutputError(f"{flag} {path}: is a folder; name a file")


@contextlib.contextmanager
def atomic_file(path: str, what: str, mode: str = "w", encoding: str = "utf-8") -> Iterator[IO]:
    """``with atomic_file(path, what) as f:`` write ``f``; it becomes ``path`` when the block ends normally and is
    removed when it raises. The folder is created when missing; a symlink is written where it leads
    (``owner.resolve``), not replaced by a file."""
    path = owner.resolve(path)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, owner.debris_name(name, "tmp"))
    try:
        os.makedirs(folder, exist_ok=True)
        f = open(tmp, mode, **({} if "b" in mode else {"encoding": encoding}))
    except OSError as e:
        raise OutputError(f"{path}: cannot write {what}: {reason(e)}") from None
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if os.path.isdir(path):
            raise OutputError(f"{path}: cannot write {what}: is a folder")
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise OutputError(f"{path}: cannot write {what}: {reason(e)}; {_left(path)}") from None
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: str, text: str, what: str) -> None:
    with atomic_file(path, what) as f:
        f.write(text)


def write_json(path: str, obj: Any, what: str, indent=None) -> None:
    """``obj`` as JSON (with a final newline when indented)."""
    with atomic_file(path, what) as f:
        json.dump(obj, f, indent=indent)
        if indent is not None:
            f.write("\n")


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def _left(path: str) -> str:
    return "the earlier file was left as it was" if os.path.exists(path) else "nothing was written"
