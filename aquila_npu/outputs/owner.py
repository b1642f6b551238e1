"""Outputs that are ours by name.

Every staging or temporary path a command writes is called ``.<target>.<kind>.pid<PID>@<HOST>`` (kind ``tmp``,
``staging`` or ``old``) beside the target it becomes, and every target is claimed for the whole run by a lock file
``.<target>.lock`` beside it that holds the owner's pid and host under an ``flock`` (which the kernel drops when the
owner dies, even by SIGKILL). So:

* a second run writing the same target refuses with one line naming the holder, however it names the target: the
  lock, the staging names and the debris they clean are those of the resolved path (``resolve``: symlinks followed),
  so ``--save link`` and ``--save target`` are one target;
* a lock left behind by a dead run is taken over, with one line;
* the run holding the lock removes what earlier runs left beside its target (one line each), and puts back an output
  a crash left moved aside (``.<target>.old.*`` while ``<target>`` is missing). Without a lock (a file system with
  no ``flock``) only debris whose owner is provably dead (same host, no such pid) is removed; a live owner's never.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import socket
from typing import Callable, Collection, Optional, Tuple

from aquila_npu.errors import OutputError

HOST = socket.gethostname()
_DEBRIS = re.compile(r"^\.(?P<target>.+)\.(?P<kind>tmp|staging|old)\.pid(?P<pid>\d+)@(?P<host>[^@/]+)$")
_OWNER = re.compile(r"^pid(?P<pid>\d+)@(?P<host>[^@/\s]+)$")

Say = Callable[[str], None]


def resolve(target: str) -> str:
    """The path ``target`` names once every symlink is followed (a symlink to a folder: that folder; a missing
    path: its resolved parent joined with its name). Locks, staging names and the "same target" test use it, so two
    runs reaching one output through different names (a symlink, ``..``) hold the same lock, and an output is written
    into a symlink's target instead of replacing the symlink."""
    return os.path.realpath(target)


def tag() -> str:
    """This process as an owner: ``pid<PID>@<HOST>``."""
    return f"pid{os.getpid()}@{HOST}"


def debris_name(target_name: str, kind: str, owner: Optional[str] = None) -> str:
    """The name of a ``kind`` (tmp, staging, old) path for ``target_name``, owned by ``owner`` (default: this
    process)."""
    return f".{target_name}.{kind}.{owner or tag()}"


def alive(pid: int, host: str) -> Optional[bool]:
    """Whether process ``pid`` of ``host`` runs: None when it is on another host (it cannot be checked from here)."""
    if host != HOST:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _parse_owner(text: str) -> Optional[Tuple[int, str]]:
    found = _OWNER.match(text.strip())
    return (int(found["pid"]), found["host"]) if found else None


def _flock(fd: int) -> Optional[bool]:
    """True: we hold the lock; False: another process does; None: this file system has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            return None
        raise


class Lock:
    """``.<target>.lock`` beside ``target``, held by one run at a time (``acquire`` / ``release``)."""

    def __init__(self, target: str, what: str):
        self.given = target
        self.target = resolve(target)
        parent, name = os.path.split(self.target)
        self.path = os.path.join(parent, f".{name}.lock")
        self.what = what
        self.flocked = False
        self._fd: Optional[int] = None

    def acquire(self, say: Say = print) -> "Lock":
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise OutputError(f"{self.path}: cannot create the lock file for {self.what} {self._named()} "
                                  f"({e.strerror})") from None
            try:
                held = _flock(fd)
                previous = os.pread(fd, 256, 0).decode(errors="replace").strip()
                owner = _parse_owner(previous)
                busy = held is False or (held is None and owner is not None and previous != tag()
                                         and alive(*owner) is not False)
                if busy:
                    who = f"pid {owner[0]} on host {owner[1]}" if owner else "another process"
                    raise OutputError(f"{self.what} {self._named()} is being written by another run ({who}, lock "
                                      f"{self.path}): wait for it to end, or remove {self.path} if that run is gone")
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if not same:  # its holder removed it between our open and our lock: start again
                    os.close(fd)
                    continue
                if owner is not None and previous != tag():
                    say(f"took over the lock {self.path} of pid {owner[0]} on host {owner[1]} (that run ended "
                        "without releasing it)")
                os.ftruncate(fd, 0)
                os.pwrite(fd, (tag() + "\n").encode(), 0)
            except BaseException:
                os.close(fd)
                raise
            self._fd, self.flocked = fd, bool(held)
            return self

    def _named(self) -> str:
        """The target as given, and where it leads when that differs (a symlink)."""
        given = os.path.abspath(self.given)
        return self.target if given == self.target else f"{self.given} (= {self.target})"

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.remove(self.path)  # while still locked: a waiting run then opens a new file
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _found(directory: str):
    """(match, entry) of the owner-named entries of ``directory``; aside copies first."""
    if not os.path.isdir(directory):
        return []
    found = [(m, e) for e in os.listdir(directory) for m in [_DEBRIS.match(e)] if m]
    found.sort(key=lambda me: me[0]["kind"] != "old")  # put back what was moved aside before removing the rest
    return found


def _restore(directory: str, m, entry: str, say: Say) -> bool:
    """Put an aside copy back where its target is missing; False when the target is there."""
    target = os.path.join(directory, m["target"])
    if m["kind"] != "old" or os.path.lexists(target):
        return False
    try:
        os.rename(os.path.join(directory, entry), target)
    except FileNotFoundError:  # another rank of this run put it back first
        return True
    say(f"restored {target} from {entry} (a run was killed while replacing it)")
    return True


def restore_aside(directory: str, say: Say = print) -> None:
    """Without a lock (before a run has claimed ``directory``): put back the outputs a dead run of this host left
    moved aside, so that they can be read."""
    for m, entry in _found(directory):
        if alive(int(m["pid"]), m["host"]) is False:
            _restore(directory, m, entry, say)


def clean(directory: str, targets: Optional[Collection[str]] = None, *, locked: bool, say: Say = print) -> None:
    """Remove the debris of other runs in ``directory`` (only that of ``targets`` when given); ``locked``: this
    process holds the targets' lock, so no other run is writing them, whatever host it ran on."""
    for m, entry in _found(directory):
        owner = f"pid{m['pid']}@{m['host']}"
        if owner == tag() or (targets is not None and m["target"] not in targets):
            continue
        state = alive(int(m["pid"]), m["host"])
        if state or (state is None and not locked):
            if state is None:
                say(f"left {os.path.join(directory, entry)}: pid {m['pid']} on host {m['host']} cannot be checked "
                    "from here; remove it if that run is over")
            continue
        if not _restore(directory, m, entry, say):
            _remove(os.path.join(directory, entry))
            say(f"removed {os.path.join(directory, entry)} (left by pid {m['pid']} on host {m['host']}, which is "
                "gone)")


def claim(target: str, what: str, *, debris_dir: str, targets: Optional[Collection[str]] = None,
          say: Say = print) -> Lock:
    """Lock ``target`` for this run and clean the debris earlier runs left for it in ``debris_dir``."""
    lock = Lock(target, what).acquire(say)
    try:
        clean(debris_dir, targets, locked=lock.flocked, say=say)
    except BaseException:
        lock.release()
        raise
    return lock
