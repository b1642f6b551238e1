"""Writes that fail in one line and leave nothing half-done.

* ``writing(path, what)``: an OSError inside (disk full, quota, I/O error) becomes one ``OutputError`` line naming
  the file, what was being written and why (``the device is full (ENOSPC)``).
* ``check_free_space``: refuse before writing when the output's size is known and the device cannot hold it.
* ``replace_dir(src, dst)``: put a finished directory in place. An existing ``dst`` is swapped with it in one step
  where the kernel can (Linux ``renameat2(RENAME_EXCHANGE)``, which Python does not expose: called through ctypes);
  elsewhere it is moved aside first, and a crash between the two renames is repaired by the next run
  (``owner.clean`` puts the old copy back).
* ``AtomicDir(target)``: a directory written under a temporary name beside ``target`` (claimed by ``owner.claim``,
  created with the usual permissions) that replaces it on success and is removed on failure. A ``target`` that is a
  symlink is written where it leads (``owner.resolve``): the symlink stays and names the new output.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
from typing import Optional

from aquila_npu.errors import OutputError
from aquila_npu.outputs import owner
from aquila_npu.outputs import crash

_FULL = (errno.ENOSPC, errno.EDQUOT)


def reason(err: OSError) -> str:
    if err.errno in _FULL:
        return f"the device is full ({errno.errorcode[err.errno]}: {os.strerror(err.errno).lower()})"
    return err.strerror or str(err)


@contextlib.contextmanager
def writing(path: str, what: str):
    """Turn an OSError while writing ``what`` to ``path`` into one OutputError line."""
    try:
        yield
    except OSError as e:
        raise OutputError(f"{path}: cannot write {what}: {reason(e)}") from None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def check_free_space(directory: str, needed: int, what: str) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise OutputError(f"{directory}: not enough space for {what}: it needs {_size(needed)}, the device has "
                          f"{_size(free)} free")


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def replace_dir(src: str, dst: str, aside: str) -> None:
    """Put the directory ``src`` at ``dst``; an existing ``dst`` is exchanged with it (or moved to ``aside`` first)
    and then removed."""
    if not os.path.lexists(dst):
        os.rename(src, dst)
        return
    if _exchange(src, dst):  # src now holds the old copy
        crash.point("between-renames")
        shutil.rmtree(src)
        return
    os.rename(dst, aside)
    crash.point("between-renames")
    os.rename(src, dst)
    shutil.rmtree(aside)


class AtomicDir:
    """``with AtomicDir(target, what, needed_bytes) as tmp:`` write into ``tmp`` (``.<name>.tmp.pid<P>@<host>``
    beside ``target``); it replaces ``target`` when the block ends normally and is removed when it raises. A write
    error ends as one OutputError line saying that the partial output was removed and ``target`` left as it was."""

    def __init__(self, target: str, what: str, needed_bytes: Optional[int] = None, say=print):
        self.target = owner.resolve(target)
        parent, self.name = os.path.split(self.target)
        self.what = what
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{parent}: cannot create the folder for {what}: {reason(e)}") from None
        self.lock = owner.claim(target, what, debris_dir=parent, targets={self.name}, say=say)  # (it resolves too)
        try:
            if needed_bytes:
                check_free_space(parent, needed_bytes, what)
            self.tmp = os.path.join(parent, owner.debris_name(self.name, "tmp"))
            shutil.rmtree(self.tmp, ignore_errors=True)
            with writing(self.tmp, what):
                os.mkdir(self.tmp)  # the umask's permissions (mkdtemp's would be 0700)
        except BaseException:
            self.lock.release()
            raise

    def __enter__(self) -> str:
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                crash.point("before-rename")
                aside = os.path.join(os.path.dirname(self.target), owner.debris_name(self.name, "old"))
                try:
                    with writing(self.target, self.what):
                        replace_dir(self.tmp, self.target, aside)
                except BaseException:
                    shutil.rmtree(self.tmp, ignore_errors=True)
                    raise
                return False
            shutil.rmtree(self.tmp, ignore_errors=True)
            left = "left as it was" if os.path.exists(self.target) else "not created"
            if isinstance(exc, OutputError):
                raise OutputError(f"{exc}; the partial output was removed, {self.target} {left}") from None
            if isinstance(exc, OSError):
                raise OutputError(f"{self.target}: cannot write {self.what}: {reason(exc)}; the partial output was "
                                  f"removed, {self.target} {left}") from None
            return False
        finally:
            self.lock.release()
