"""The pre-flight of a torchrun launch (issue 29): ``python -m aquila_npu.preflight <torchrun's arguments>`` checks
the command's inputs and layout once, for the processes the launch would start, before the example scripts call
torchrun (``examples/aquila2/launch.sh``)."""

import os
import subprocess
import sys

import pytest

from helpers import ROOT, assert_one_line_error, build_assets, child_env, stub_torchrun_argv

TINY_CPU = os.path.join(ROOT, "examples", "aquila2", "pretrain_aquila2_tiny_cpu.sh")
TRAIN = ["--device", "cpu", "--model", "aquila2-tiny", "--mock-data", "--seq-length", "32", "--micro-batch-size", "1",
         "--global-batch-size", "2", "--train-iters", "1", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(str(tmp_path_factory.mktemp("preflight")), layouts=((2, 1),))


def preflight(*args):
    return subprocess.run([sys.executable, "-m", "aquila_npu.preflight", *map(str, args)], env=child_env(),
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_the_launch_world_is_nproc_per_node_times_nnodes():
    from aquila_npu.cli.preflight import parse

    args = parse(["--nnodes", "2", "--nproc-per-node", "8", "--rdzv-backend", "c10d", "-m", "aquila_npu.pretrain",
                  *TRAIN])
    assert (args.command, args.world, args.command_args.train_iters) == ("pretrain", 16, 1)
    assert parse(["--nproc_per_node=4", "--nnodes", "1:2", "-m", "aquila_npu.pretrain", *TRAIN]).world == 8


@pytest.mark.parametrize("argv, words", [
    (["--nproc-per-node", "2", "aquila_npu/pretrain.py"], "-m aquila_npu.<command>"),
    (["--nproc-per-node", "2", "-m", "some.module"], "-m some.module"),
    (["--nproc-per-node", "many", "-m", "aquila_npu.pretrain", *TRAIN], "--nproc-per-node many"),
    (["--nproc-per-node", "2", "-m", "aquila_npu.pretrain", *TRAIN, "--no-such-flag"], "--no-such-flag"),
])
def test_a_bad_launch_line_is_one_line_and_status_2(argv, words):
    r = preflight(*argv)
    assert r.returncode == 2, r.stderr
    assert_one_line_error(r.stderr)
    assert words in r.stderr


def test_a_layout_the_processes_cannot_hold_is_refused_before_torchrun(tmp_path):
    """The tiny script with TP=3 on 2 processes: one line naming the fix, and torchrun never starts."""
    with pytest.raises(AssertionError) as failed:
        stub_torchrun_argv(TINY_CPU, tmp_path, TP="3", PREFLIGHT="1")
    stderr = str(failed.value)
    assert_one_line_error(stderr)
    assert "--tensor-model-parallel-size 3" in stderr and "launch 3 (or a multiple)" in stderr
    assert not (tmp_path / "torchrun-args.txt").exists()


def test_a_good_launch_passes_then_torchrun_gets_the_same_arguments(tmp_path):
    launcher, module, argv = stub_torchrun_argv(TINY_CPU, tmp_path, PREFLIGHT="1")
    assert module == "aquila_npu.pretrain" and launcher["--nproc_per_node"] == "2"
    r = preflight("--nproc_per_node", "2", "-m", module, *argv)
    assert r.returncode == 0, r.stderr
    assert "preflight: aquila_npu.pretrain with 2 process(es)" in r.stdout and "are fine" in r.stdout


def test_generate_checks_the_checkpoint_layout_for_the_launch(assets, tmp_path):
    common = ["-m", "aquila_npu.generate", "--load", assets[2, 1], "--tokenizer-name-or-path", assets["hf"],
              "--prompt", "kalo", "--device", "cpu"]
    r = preflight("--nproc-per-node", "3", *common)
    assert r.returncode == 2
    assert_one_line_error(r.stderr)
    assert "3 process(es) cannot run the tp2-pp1 checkpoint" in r.stderr
    assert preflight("--nproc-per-node", "2", *common).returncode == 0


def test_evaluate_checks_tasks_and_data_before_any_worker(assets, tmp_path):
    common = ["--nproc-per-node", "2", "-m", "aquila_npu.evaluate", "--load", assets[2, 1],
              "--tokenizer-name-or-path", assets["hf"], "--device", "cpu"]
    r = preflight(*common, "--task", "boolq,nope")
    assert r.returncode == 2 and "unknown task nope" in r.stderr
    r = preflight(*common, "--task", "boolq", "--task-data-path", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and "missing.jsonl" in r.stderr
    assert_one_line_error(r.stderr)
