"""One contract for every command (aquila_npu.cli.common.run_cli): the flags parsed (argparse's own errors one line
too), the versions checked, one library call; a user error ends as one line and exit status 2, a failed check as one
line and exit status 1. One table of accepted-but-ignored ModelLink flags (aquila_npu.flags.INERT_FLAGS), each given
one named in the command's start-up line."""

import argparse
import importlib
import pathlib
import subprocess
import sys

import pytest

from aquila_npu.cli.common import Parser, run_cli
from aquila_npu.errors import CheckFailed, DataError
from aquila_npu.flags import INERT_FLAGS, add_inert_arguments, inert_given, inert_note
from helpers import assert_one_line_error, child_env

CLI = pathlib.Path(__file__).resolve().parents[1] / "aquila_npu" / "cli"
COMMANDS = sorted(p.stem for p in CLI.glob("*.py") if "\ndef main(" in p.read_text())


def _parse(argv):
    p = Parser(prog="x")
    p.add_argument("--n", type=int, required=True)
    return p.parse_args(argv)


def _fails(error):
    def job(args):
        raise error

    return job


@pytest.mark.parametrize("argv,job,status,label", [
    (["--n", "1"], lambda args: 0, 0, None),
    (["--n", "abc"], lambda args: 0, 2, "x: error: argument --n: invalid int value: 'abc'"),
    ([], lambda args: 0, 2, "x: error: the following arguments are required: --n"),
    (["--n", "1"], _fails(DataError("--data-path d: not found")), 2, "x: error: --data-path d: not found"),
    (["--n", "1"], _fails(CheckFailed("max |logits - HF| = 0.5")), 1, "x: check failed: max |logits - HF| = 0.5"),
])
def test_run_cli_ends_every_error_in_one_line_with_its_status(capsys, argv, job, status, label):
    assert run_cli("x", _parse, job, argv, requires=()) == status
    err = capsys.readouterr().err
    if label is None:
        assert err == ""
    else:
        assert err.strip() == label  # one line, no usage block


def test_run_cli_imports_the_library_call_only_after_parsing(capsys):
    assert run_cli("x", _parse, "no_such_module_xyz:run", ["--n", "zz"], requires=()) == 2  # parse failed first
    with pytest.raises(ModuleNotFoundError):
        run_cli("x", _parse, "no_such_module_xyz:run", ["--n", "1"], requires=())


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_is_a_parser_and_one_library_call(command):
    """Each cli module's main is ``run_cli(PROG, parse, "module:function", argv)`` and the function exists."""
    source = (CLI / f"{command}.py").read_text()
    main = source[source.index("\ndef main("):]
    call = main[main.index("run_cli("):main.index(")", main.index("run_cli(")) + 1]
    target = call.split('"')[1]
    module, _, name = target.partition(":")
    assert callable(getattr(importlib.import_module(module), name)), target


def test_every_inert_flag_is_accepted_somewhere_and_named_when_given():
    used = set()
    for command in COMMANDS:
        module = importlib.import_module(f"aquila_npu.cli.{command}")
        used |= set(getattr(module, "INERT", ()))
    used |= set(importlib.import_module("aquila_npu.cli.inference_args").INERT)
    assert used == set(INERT_FLAGS)
    p = argparse.ArgumentParser()
    p.add_argument("--sequence-parallel", action="store_true")  # a real flag of this command
    add_inert_arguments(p, ["--swiglu", "--saver", "--dataset-impl"])
    args = p.parse_args(["--swiglu", "--saver", "mcore", "--sequence-parallel"])
    assert inert_given(args) == ["--swiglu", "--saver mcore"]  # not --sequence-parallel: it works here
    assert inert_note(args) == ("; no effect here: --swiglu (Aquila2 always has a SwiGLU MLP), --saver mcore ("
                                + INERT_FLAGS["--saver"].why + ")")


def test_pretrain_names_the_inert_flags_given_in_its_start_up_line():
    proc = subprocess.run([sys.executable, "-m", "aquila_npu.pretrain", "--model", "aquila2-tiny", "--mock-data",
                           "--train-iters", "1", "--seq-length", "16", "--device", "cpu", "--swiglu",
                           "--lora-ckpt-filter"], env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    banner = next(line for line in proc.stdout.splitlines() if line.startswith("aquila_npu.pretrain: aquila2-tiny"))
    assert "no effect here: --swiglu (Aquila2 always has a SwiGLU MLP), --lora-ckpt-filter (" in banner


def test_an_argparse_error_of_pretrain_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "aquila_npu.pretrain", "--lr", "abc"], env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr)
    assert proc.stderr.strip() == "aquila_npu.pretrain: error: argument --lr: invalid float value: 'abc'"
