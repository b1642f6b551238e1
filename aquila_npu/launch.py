"""Our commands in child processes: ``python -m <module>`` for one process, ``torchrun`` for several
(``launch_command``), with their output logged and a time limit (``run_logged``). The benchmark, the first-hour
report and the demo start their runs through here."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
from typing import List, Optional

from aquila_npu.errors import BenchmarkFailed
from aquila_npu.ports import free_port

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the folder holding aquila_npu


def torchrun(nproc: int) -> List[str]:
    """torch's launcher for ``nproc`` local processes on a free rendezvous port (``--master-port 0`` hangs)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
            str(free_port())]


def launch_command(nproc: int, argv: List[str], module: str = "aquila_npu.pretrain") -> List[str]:
    """``python -m module argv``, under torchrun for several processes."""
    if nproc == 1:
        return [sys.executable, "-m", module, *argv]
    return [*torchrun(nproc), "-m", module, *argv]


def run_logged(cmd: List[str], log_path: str, timeout: Optional[float], echo=None) -> int:
    """Run a (training) process in its own process group, its output to ``log_path``; ``echo`` gets its iteration
    lines as they come. Past ``timeout`` seconds the group (torchrun and its workers) is killed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, start_new_session=True)

        def copy():
            for line in proc.stdout:
                log.write(line)
                if echo and line.startswith(" iteration"):
                    echo(line.rstrip())

        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchmarkFailed(f"the run passed --timeout {timeout:g}s and was stopped; log: "
                                 f"{log_path}") from None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            reader.join(timeout=10)
        return rc
