"""What every command shares: ``run_cli`` (the command contract: parse, check versions, one library call; any
``AquilaError`` ends as one line and its exit status), the argument groups built from their one table (device, fused
switches, architecture, the inference model group), the flags that are accepted for ModelLink command lines but
change nothing here, and rank-0 printing.

Importing this module imports neither torch nor megatron-core (every command answers --help and checks its flags
before either is imported).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import sys
from typing import Callable, List, Optional, Union

from aquila_npu.compat import versions
from aquila_npu.device import DEVICES
from aquila_npu.errors import AquilaError, UsageError

REQUIRES = ("torch", "megatron-core")  # what every command but the data pipeline runs on

DEVICE_CHOICES = ("auto",) + DEVICES


class Parser(argparse.ArgumentParser):
    """argparse's parser whose errors (an unknown flag, a value of the wrong type, a missing required flag) end as
    one line and exit status 2 through ``run_cli``, like every other input error, instead of the usage block."""

    def error(self, message: str):
        raise UsageError(message)


def add_device_argument(group) -> None:
    group.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                       help="where to run: auto (an NPU if torch_npu sees one, else a CUDA GPU, else the CPU), npu, "
                            "cuda or cpu (or the AQUILA_DEVICE environment variable; default auto)")


def _teardown_distributed(started_here: bool, finished: bool) -> None:
    """Destroy what ``main`` set up (megatron-core's groups, the process group), never a caller's. After a run that
    finished, every rank first meets the others: destroying a gloo group while another rank still sends to it hangs
    now and then (seen once in CI, torch 2.6, an evaluation whose output was written; pytorch/pytorch#75097)."""
    torch = sys.modules.get("torch")
    if not started_here or torch is None or not torch.distributed.is_initialized():
        return
    if finished:
        torch.distributed.barrier()
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None and ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def library_call(target: Union[str, Callable]) -> Callable:
    """``"package.module:function"`` imported now (after the flags are parsed), or the callable itself."""
    if callable(target):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def run_cli(prog: str, parse: Callable[[Optional[List[str]]], argparse.Namespace], job: Union[str, Callable],
            argv: Optional[List[str]] = None, *, requires=REQUIRES) -> int:
    """The command contract: ``parse(argv)`` (flags checked without torch or megatron-core), the versions of
    ``requires`` checked (aquila_npu.compat.versions), then one library call ``job(args)``, imported only now and
    returning the exit status. An ``AquilaError`` ends as one line ``<prog>: <label>: <message>`` on stderr and its
    exit status (2 for what the user can fix, 1 for a check that failed); anything else is a bug and keeps its
    traceback."""
    torch = sys.modules.get("torch")
    started_here = torch is None or not torch.distributed.is_initialized()
    finished = False
    try:
        args = parse(argv)
        versions.require(*requires)
        status = library_call(job)(args)  # the exit status
        finished = True
        return status
    except AquilaError as e:
        print(f"{prog}: {e.label}: {e}", file=sys.stderr, flush=True)
        return e.exit_status
    finally:
        _teardown_distributed(started_here, finished)
        # The process usually ends now. Exit handlers and the interpreter's last garbage collections would walk every
        # object torch, megatron-core and sympy created (1.3-2 s of a 7 s one-token generate on a 2-core CPU):
        # gc.freeze() as the first exit handler to run (handlers run last-registered first) moves them out of the
        # collector's reach; they are still freed as the modules are torn down. Once per process.
        atexit.unregister(gc.freeze)
        atexit.register(gc.freeze)
