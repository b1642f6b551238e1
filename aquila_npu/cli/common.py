"""What every command shares: ``run_cli`` (one error line and exit status 2 for any ``UserError``), the argument
groups built from their one table (device, fused switches, architecture, the inference model group), the flags that
are accepted for ModelLink command lines but change nothing here, and rank-0 printing.

Importing this module imports neither torch nor megatron-core (the converter and the data pipeline start fast).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import sys
from typing import Callable, Dict, Iterable, List, Optional

from aquila_npu.device import DEVICES
from aquila_npu.errors import UsageError, UserError

DEVICE_CHOICES = ("auto",) + DEVICES

# Flags ModelLink's scripts pass that change nothing here, and why. Each command accepts the ones its scripts use and
# its start-up banner lists those given (``inert_given``), so no speed- or numerics-relevant flag is silently ignored.
INERT_FLAGS: Dict[str, str] = {
    "--attention-softmax-in-fp32": "always on (attention softmax runs in fp32)",
    "--no-masked-softmax-fusion": "the backend chooses the attention kernel (--use-flash-attn)",
    "--no-gradient-accumulation-fusion": "gradient-accumulation fusion is never used",
    "--swiglu": "Aquila2 always has a SwiGLU MLP",
    "--disable-bias-linear": "Aquila2 has no linear biases",
    "--exit-on-missing-checkpoint": "inference always needs its --load checkpoint",
    "--no-load-optim": "inference loads weights only",
    "--no-load-rng": "inference loads weights only",
    "--sequence-parallel": "inference runs without sequence parallelism",
    "--exit-signal-handler": "always on: SIGTERM / SIGINT stop training at the end of the iteration, after saving "
                             "a checkpoint with --save",
}


def add_inert_arguments(parser: argparse.ArgumentParser, flags: Iterable[str]) -> None:
    g = parser.add_argument_group("accepted for ModelLink command lines; no effect here (the banner lists them)")
    for flag in flags:
        g.add_argument(flag, action="store_true", help=INERT_FLAGS[flag])


def inert_given(args: argparse.Namespace, flags: Iterable[str] = INERT_FLAGS) -> List[str]:
    """The inert flags given on this command line."""
    return [f for f in flags if getattr(args, f[2:].replace("-", "_"), False)]


def inert_note(args: argparse.Namespace, flags: Iterable[str] = INERT_FLAGS) -> str:
    given = inert_given(args, flags)
    return "; no effect here: " + ", ".join(f"{f} ({INERT_FLAGS[f]})" for f in given) if given else ""


def add_device_argument(group) -> None:
    group.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                       help="where to run: auto (default: npu, else cuda, else cpu), npu, cuda or cpu "
                            "(or the AQUILA_DEVICE environment variable)")


def check_positive(args: argparse.Namespace, *dests: str) -> None:
    """Each named flag, when given, must be >= 1."""
    for dest in dests:
        value = getattr(args, dest)
        if value is not None and value < 1:
            raise UsageError(f"--{dest.replace('_', '-')} {value} must be >= 1")


def check_output_file(flag: str, path: Optional[str]) -> None:
    """An output file's folder must exist (checked before any work)."""
    if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise UsageError(f"{flag} {path}: the folder does not exist")


def print0(*a, **kw) -> None:
    """print on global rank 0 only (or when torch.distributed is not running)."""
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None) if torch else None
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **kw, flush=True)


def _teardown_distributed(started_here: bool) -> None:
    """Destroy what ``main`` set up (megatron-core's groups, the process group), never a caller's."""
    torch = sys.modules.get("torch")
    if not started_here or torch is None or not torch.distributed.is_initialized():
        return
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None and ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def run_cli(prog: str, main: Callable[[Optional[List[str]]], int], argv: Optional[List[str]] = None) -> int:
    """Run a command's ``main``: a ``UserError`` ends as one line ``<prog>: error: <message>`` on stderr and exit
    status 2 (argparse's own status for bad flags); anything else is a bug and keeps its traceback."""
    torch = sys.modules.get("torch")
    started_here = torch is None or not torch.distributed.is_initialized()
    try:
        return main(argv)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        _teardown_distributed(started_here)
        # The process usually ends now. Exit handlers and the interpreter's last garbage collections would walk every
        # object torch, megatron-core and sympy created (1.3-2 s of a 7 s one-token generate on a 2-core CPU):
        # gc.freeze() as the first exit handler to run (handlers run last-registered first) moves them out of the
        # collector's reach; they are still freed as the modules are torn down. Once per process.
        atexit.unregister(gc.freeze)
        atexit.register(gc.freeze)
