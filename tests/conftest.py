import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aquila_npu.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def torchrun(script: str, nproc: int, args, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a worker under torchrun on the CPU (gloo), one thread per process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    env.pop("AQUILA_DEVICE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()),
           *(script.split() if script.startswith("-m ") else [str(ROOT / script)]), *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not present: {SHARED_DATA} (a user's clone has no ../shared)")
    return SHARED_DATA


def stub_torchrun_argv(script, tmp_path, **env_vars):
    """Run an example script with a stand-in ``torchrun`` that records its arguments (no CANN, no devices);
    returns (launcher flags dict, module, the module's argv)."""
    stub = tmp_path / "stub-bin"
    stub.mkdir(exist_ok=True)
    (stub / "torchrun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$STUB_OUT"\n')
    (stub / "torchrun").chmod(0o755)
    record = tmp_path / "torchrun-args.txt"
    env = {k: v for k, v in os.environ.items()
           if k not in ("TP", "PP", "PROMPT", "PROMPTS_FILE", "OUTPUT", "CHAT", "DATA_PATH", "CKPT_SAVE_DIR")}
    env.update(PATH=f"{stub}:{env['PATH']}", STUB_OUT=str(record), CANN_SET_ENV=str(tmp_path / "none.sh"),
               **{k: str(v) for k, v in env_vars.items()})
    proc = subprocess.run(["bash", str(script)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    argv = record.read_text().splitlines()
    i = argv.index("-m")
    return dict(zip(argv[:i:2], argv[1:i:2])), argv[i + 1], argv[i + 2:]
