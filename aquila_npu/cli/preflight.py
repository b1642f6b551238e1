"""``python -m aquila_npu.preflight <torchrun's arguments>``: a launch checked in one process before torchrun starts
its workers: the command's flags, data, tokenizer and checkpoint, and the layout against the number of processes the
launch would start. A bad input is one line and exit status 2, as with plain ``python``, instead of one line per
worker followed by torchrun's own failure report; a good one prints one line and exit status 0. The example scripts
run it first (``examples/aquila2/launch.sh``; ``PREFLIGHT=0`` skips it).

    python -m aquila_npu.preflight --nproc-per-node 8 --nnodes 2 -m aquila_npu.pretrain <pretrain flags>
    torchrun                       --nproc-per-node 8 --nnodes 2 -m aquila_npu.pretrain <pretrain flags>

The same arguments as torchrun: its own flags (``--nproc-per-node``/``--nproc_per_node``, ``--nnodes``; the others
are accepted and not needed here), ``-m``, the module and its flags. Modules checked beyond their flags:
aquila_npu.pretrain, aquila_npu.generate, aquila_npu.evaluate; any other command of ours: its flags.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from aquila_npu.cli.common import Parser, run_cli
from aquila_npu.errors import UsageError

PROG = "python -m aquila_npu.preflight"
COMMANDS = ("pretrain", "generate", "evaluate", "benchmark", "selfcheck")  # python -m aquila_npu.<command>


def _world(value: str, flag: str) -> int:
    """torchrun's ``--nproc-per-node N`` / ``--nnodes N`` or ``MIN:MAX`` (elastic: the most it would start)."""
    try:
        return int(value.split(":")[-1])
    except ValueError:
        raise UsageError(f"{flag} {value}: the pre-flight needs a number of processes (not {value!r})") from None


def parse(argv=None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: {PROG} [torchrun's flags] -m aquila_npu.<command> [its flags]\n\n{__doc__}")
        raise SystemExit(0)
    if "-m" not in argv:
        raise UsageError("give torchrun's arguments: ... -m aquila_npu.<command> <its flags>")
    i = argv.index("-m")
    launcher, module, rest = argv[:i], argv[i + 1] if i + 1 < len(argv) else "", argv[i + 2:]
    p = Parser(prog=PROG, add_help=False)
    p.add_argument("--nproc-per-node", "--nproc_per_node", default="1")
    p.add_argument("--nnodes", default="1")
    known, _ = p.parse_known_args(launcher)  # rendezvous flags and the like: not needed for the checks
    command = module[len("aquila_npu."):] if module.startswith("aquila_npu.") else None
    if command not in COMMANDS:
        raise UsageError(f"-m {module}: the pre-flight checks python -m aquila_npu.<command>, one of "
                         f"{', '.join(COMMANDS)}")
    cli = importlib.import_module(f"aquila_npu.cli.{command}")
    command_args = cli.parse(rest)  # the command's own flag errors: its one line
    return argparse.Namespace(command=command, command_args=command_args, prog=cli.PROG,
                              world=_world(known.nproc_per_node, "--nproc-per-node") * _world(known.nnodes, "--nnodes"))


def main(argv=None) -> int:
    return run_cli(PROG, parse, "aquila_npu.jobs.preflight:run", argv)


if __name__ == "__main__":
    sys.exit(main())
