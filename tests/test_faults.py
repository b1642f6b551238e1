"""Faults end in one line and leave nothing behind (issue 18).

A kill (SIGKILL, through the test-only seam ``aquila_npu.testing.faults``) at each step of a training save and of a
conversion in both directions: the tracker names a complete checkpoint (the target is absent, untouched or
complete), the rerun succeeds and removes the debris, and a resumed run repeats the uninterrupted one bit for bit.
A full disk (a small tmpfs) while saving, converting and preprocessing; two runs on one output; stale locks and
debris; SIGTERM / SIGINT / --exit-duration-in-mins; data files that are missing, truncated or of a larger vocabulary.

Runs are forked from a forkserver that imported torch and megatron-core once (``helpers.forked``: a tiny run takes
about a second), so each fault costs no interpreter start.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from functools import partial

import numpy as np
import pytest
import torch

from helpers import (assert_one_line_error, call_main, child_env, exit_now, forked, hold_lock, start_forked,
                     start_ranks, train_data_tokenizer, wait_forked, wait_ranks)

from aquila_npu.checkpoint import safe_load
from aquila_npu.checkpoint.convert import to_megatron
from aquila_npu.checkpoint.hf_io import HFReader
from aquila_npu.checkpoint.megatron_io import CheckpointInfo, MegatronReader
from aquila_npu.cli.convert import main as convert_main
from aquila_npu.cli.preprocess import main as preprocess_main
from aquila_npu.cli.pretrain import main as pretrain_main
from aquila_npu.outputs import owner
from aquila_npu.ports import free_port
from aquila_npu.outputs import crash as faults
from aquila_npu.testing.trees import digest, hidden
from aquila_npu.testing.tiny_hf import tiny_llama
from aquila_npu.weights.mapping import hf_names

TRAIN = ["--model", "aquila2-tiny", "--mock-data", "--micro-batch-size", 2, "--seq-length", 32, "--lr", 1e-3,
         "--lr-decay-style", "constant", "--log-interval", 1]


def _pretrain(*args):
    return partial(pretrain_main, [str(a) for a in [*TRAIN, *args]])


def _convert(*args):
    return partial(convert_main, [str(a) for a in args])


def _to_mg(src, dst, *extra):
    return _convert("--loader", "llama2_hf", "--saver", "megatron", "--load-dir", src, "--save-dir", dst, *extra)


def _to_hf(src, dst, *extra):
    return _convert("--loader", "megatron", "--saver", "megatron", "--save-model-type", "save_huggingface_llama",
                    "--load-dir", src, "--save-dir", dst, *extra)


def _losses(path):
    with open(path) as f:
        return [json.loads(line)["lm_loss"] for line in f]


def _error_line(log):
    text = open(log).read()
    assert_one_line_error(text)
    return [ln for ln in text.splitlines() if ": error: " in ln][0]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults") / "hf"
    tiny_llama().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def hf_state(hf):
    reader = HFReader(str(hf))
    return {name: reader.get(name).clone() for name in hf_names(reader.spec)}


@pytest.fixture(scope="module")
def mg(hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults-mg") / "mg"
    to_megatron(HFReader(str(hf)), str(out), 1, 1)
    return out


def _assert_converted(path, hf_state, megatron):
    """``path`` holds the whole model, equal to the HF original."""
    reader = MegatronReader(str(path)) if megatron else HFReader(str(path))
    for name, t in hf_state.items():
        assert torch.equal(reader.get(name), t), name


# -------------------------------------------------------------------------------------------- kills: conversion
CONVERT_CASES = [(d, p, e) for d in ("hf2mg", "mg2hg") for p in faults.POINTS if p != "before-tracker"
                 for e in (False, True) if e or p != "between-renames"]


@pytest.mark.parametrize("direction,point,existing", CONVERT_CASES,
                         ids=[f"{d}-{p}-{'replace' if e else 'new'}" for d, p, e in CONVERT_CASES])
def test_conversion_killed_at_each_step(hf, mg, hf_state, tmp_path, direction, point, existing):
    out = tmp_path / "out"
    out.mkdir()
    if direction == "hf2mg":
        target, run = out / "mg", _to_mg(hf, out / "mg")
        if existing:  # an earlier conversion of the same model (another dtype): must stay whole until replaced
            assert forked(_to_mg(hf, target, "--params-dtype", "bf16"), tmp_path / "old.log") == 0
    else:
        target, run = out / "mg2hg", _to_hf(mg, out)
        if existing:
            assert forked(_to_hf(mg, out, "--params-dtype", "bf16"), tmp_path / "old.log") == 0
    before = digest(target)
    assert forked(run, tmp_path / "killed.log", AQUILA_FAULT=point) == -signal.SIGKILL
    if point != "between-renames":
        assert digest(target) == before  # absent, or untouched
    elif target.exists():  # swapped in one step (renameat2): the new output is complete, the old one aside
        _assert_converted(target, hf_state, direction == "hf2mg")
    else:  # a file system that cannot swap: the old copy is aside, and the next run puts it back first
        assert [e for e in hidden(out) if ".old." in e]
    assert [e for e in hidden(out) if ".tmp." in e or ".old." in e], "the fault did not hit mid-way"
    assert forked(run, tmp_path / "rerun.log") == 0
    log = open(tmp_path / "rerun.log").read()
    assert "removed " in log and "which is gone" in log, log[-2000:]
    _assert_converted(target, hf_state, direction == "hf2mg")
    assert hidden(out) == [] and not [p for p in os.listdir(target) if p.startswith(".")]


def test_the_window_of_the_two_renames_is_repaired_by_the_next_run(mg, tmp_path):
    """Where the kernel cannot swap directories, a crash between moving the old output aside and moving the new one
    in leaves the target missing: the next run puts the old copy back before anything else."""
    out = tmp_path / "out"
    out.mkdir()
    gone = start_forked(exit_now, tmp_path / "gone.log")
    wait_forked(gone)  # a pid that is gone
    pid = gone.pid
    shutil.copytree(mg, out / f".mg.old.pid{pid}@{owner.HOST}")
    os.mkdir(out / f".mg.tmp.pid{pid}@{owner.HOST}")  # the new copy, complete or not
    lines = []
    owner.claim(str(out / "mg"), "--save-dir", debris_dir=str(out), targets={"mg"}, say=lines.append).release()
    assert digest(out / "mg") == digest(mg) and hidden(out) == [], lines
    assert any(line.startswith("restored ") for line in lines) and any("removed " in line for line in lines)


def test_debris_of_a_live_run_is_never_touched(tmp_path):
    proc = start_forked(partial(time.sleep, 60), tmp_path / "live.log")
    pid = proc.pid
    try:
        live = tmp_path / f".ck.staging.pid{pid}@{owner.HOST}"
        other = tmp_path / ".ck.staging.pid1@another-host"
        live.mkdir()
        other.mkdir()
        lines = []
        owner.clean(str(tmp_path), {"ck"}, locked=False, say=lines.append)
        assert live.exists() and other.exists()  # alive; on another host: cannot be checked, so left (and said)
        assert len(lines) == 1 and "another-host" in lines[0]
        owner.clean(str(tmp_path), {"ck"}, locked=True, say=lines.append)
        assert live.exists() and not other.exists()  # holding the lock, no other run can be writing it
    finally:
        proc.kill()
        wait_forked(proc)


def test_converted_directories_get_the_usual_permissions(hf, tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    assert forked(_to_mg(hf, tmp_path / "mg"), tmp_path / "c.log") == 0
    assert os.stat(tmp_path / "mg").st_mode & 0o777 == 0o777 & ~umask


# ------------------------------------------------------------------------------------------ kills: training save
@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run of 6 iterations saving every 2: its losses and checkpoints."""
    d = tmp_path_factory.mktemp("straight")
    assert forked(_pretrain("--train-iters", 6, "--save", d / "ck", "--save-interval", 2, "--metrics-file",
                            d / "m.jsonl"), d / "log") == 0
    return d


@pytest.mark.parametrize("point", faults.POINTS)
def test_training_save_killed_at_each_step(straight, tmp_path, point):
    ck = tmp_path / "ck"
    shutil.copytree(straight / "ck", ck)
    (ck / "latest_checkpointed_iteration.txt").write_text("2")  # as if the run had stopped after iteration 2
    if point != "between-renames":  # there, iteration 4 is saved again over the earlier copy
        shutil.rmtree(ck / "iter_0000004")
    shutil.rmtree(ck / "iter_0000006")
    resume = ["--train-iters", 6, "--load", ck, "--save", ck, "--save-interval", 2]
    assert forked(_pretrain(*resume), tmp_path / "killed.log", AQUILA_FAULT=point) == -signal.SIGKILL
    info = CheckpointInfo.read(str(ck))  # the tracker names a complete checkpoint
    assert info.iteration == 2
    for f in ("model_optim_rng.pt",):
        assert safe_load.load(os.path.join(info.rank_path(0, 0), f))["iteration"] == 2
    assert [e for e in hidden(ck) if ".staging." in e], "the fault did not hit mid-way"
    assert forked(_pretrain(*resume, "--metrics-file", tmp_path / "m.jsonl"), tmp_path / "rerun.log") == 0
    assert _losses(tmp_path / "m.jsonl") == _losses(straight / "m.jsonl")[2:]  # bit for bit
    assert hidden(ck) == [] and hidden(tmp_path) == []
    assert "which is gone" in open(tmp_path / "rerun.log").read()


def test_training_checkpoint_left_aside_is_put_back_before_resuming(straight, tmp_path):
    """Where directories cannot be swapped in one step, a kill between the two renames of a re-saved iteration
    leaves the tracker naming a directory that is aside: the next run on that --save puts it back, then resumes."""
    ck = tmp_path / "ck"
    shutil.copytree(straight / "ck", ck)
    (ck / "latest_checkpointed_iteration.txt").write_text("4")
    shutil.rmtree(ck / "iter_0000006")
    gone = start_forked(exit_now, tmp_path / "gone.log")
    wait_forked(gone)
    os.rename(ck / "iter_0000004", ck / f".iter_0000004.old.pid{gone.pid}@{owner.HOST}")
    os.mkdir(ck / f".iter_0000004.staging.pid{gone.pid}@{owner.HOST}")
    assert forked(_pretrain("--train-iters", 6, "--load", ck, "--save", ck, "--metrics-file", tmp_path / "m.jsonl"),
                  tmp_path / "log") == 0
    assert "restored " in open(tmp_path / "log").read()
    assert _losses(tmp_path / "m.jsonl") == _losses(straight / "m.jsonl")[4:]
    assert hidden(ck) == []


# ------------------------------------------------------------------------------------ two runs, signals, timeouts
def _wait_for(predicate, timeout=120):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_second_run_on_one_save_refuses_and_sigterm_saves_then_resumes_exactly(tmp_path):
    ck, metrics = tmp_path / "ck", tmp_path / "a.jsonl"
    a = start_forked(_pretrain("--train-iters", 100000, "--save", ck, "--save-interval", 100000, "--metrics-file",
                               metrics), tmp_path / "a.log")
    try:
        _wait_for(lambda: os.path.exists(metrics) and len(open(metrics).readlines()) >= 3)
        assert forked(_pretrain("--train-iters", 10, "--save", ck), tmp_path / "b.log") == 2
        line = _error_line(tmp_path / "b.log")
        assert f"pid {a.pid} on host {owner.HOST}" in line and "--save" in line, line
        os.kill(a.pid, signal.SIGTERM)
    finally:
        rc = wait_forked(a)
    assert rc == 0, open(tmp_path / "a.log").read()[-3000:]
    n = len(_losses(metrics))
    log = open(tmp_path / "a.log").read()
    assert f"stopping after iteration {n} (received SIGTERM)" in log and f"saved checkpoint at iteration {n}" in log
    assert CheckpointInfo.read(str(ck)).iteration == n and hidden(ck) == [] and hidden(tmp_path) == []
    assert forked(_pretrain("--train-iters", n + 2, "--load", ck, "--metrics-file", tmp_path / "r.jsonl"),
                  tmp_path / "r.log") == 0
    assert forked(_pretrain("--train-iters", n + 2, "--metrics-file", tmp_path / "s.jsonl"), tmp_path / "s.log") == 0
    assert _losses(tmp_path / "r.jsonl") == _losses(tmp_path / "s.jsonl")[n:]


def test_sigint_and_exit_duration_stop_after_the_iteration_and_save(tmp_path):
    metrics = tmp_path / "m.jsonl"
    proc = start_forked(_pretrain("--train-iters", 100000, "--save", tmp_path / "ck", "--metrics-file", metrics),
                        tmp_path / "int.log")
    _wait_for(lambda: os.path.exists(metrics) and len(open(metrics).readlines()) >= 2)
    os.kill(proc.pid, signal.SIGINT)
    assert wait_forked(proc) == 0
    assert CheckpointInfo.read(str(tmp_path / "ck")).iteration == len(_losses(metrics))
    assert forked(_pretrain("--train-iters", 100000, "--save", tmp_path / "ck2", "--exit-duration-in-mins", 1e-4),
                  tmp_path / "dur.log") == 0
    assert "--exit-duration-in-mins reached" in open(tmp_path / "dur.log").read()
    assert CheckpointInfo.read(str(tmp_path / "ck2")).iteration >= 1


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_after_the_same_iteration(tmp_path):
    ck, metrics = tmp_path / "ck", tmp_path / "m.jsonl"
    argv = [str(a) for a in [*TRAIN, "--train-iters", 100000, "--save", ck, "--metrics-file", metrics]]
    ranks = start_ranks(partial(pretrain_main, argv), 2, tmp_path)
    try:
        _wait_for(lambda: os.path.exists(metrics) and len(open(metrics).readlines()) >= 2)
        os.kill(ranks[1].pid, signal.SIGTERM)  # only rank 1 gets it; rank 0 learns it through the per-iteration vote
    finally:
        assert wait_ranks(ranks) == [0, 0], (tmp_path / "rank0.log").read_text()[-3000:]
    n = CheckpointInfo.read(str(ck)).iteration
    assert n == len(_losses(metrics))
    assert f"stopping after iteration {n} (received SIGTERM)" in (tmp_path / "rank0.log").read_text()
    assert hidden(ck) == [] and hidden(tmp_path) == []


@pytest.mark.slow
def test_sigterm_under_torchrun_saves_and_exits_0(tmp_path):
    """A scheduler's SIGTERM to every worker of a torchrun run: they save after the same iteration, and torchrun
    ends with status 0 (signalling torchrun itself as well makes it report its own SignalException: docs/faults.md)."""
    ck, metrics = tmp_path / "ck", tmp_path / "m.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "aquila_npu.pretrain", *map(str, TRAIN), "--train-iters", "100000", "--save", str(ck),
           "--metrics-file", str(metrics)]
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: os.path.exists(metrics) and len(open(metrics).readlines()) >= 2, timeout=300)
        for pid in _children(proc.pid):
            os.kill(pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "Traceback" not in out, out[-3000:]
    n = CheckpointInfo.read(str(ck)).iteration
    assert n == len(_losses(metrics)) and f"stopping after iteration {n} (received SIGTERM)" in out
    assert hidden(ck) == [] and hidden(tmp_path) == []


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_second_conversion_on_one_save_dir_refuses_naming_the_holder(hf, tmp_path):
    target = tmp_path / "mg"
    holder = start_forked(partial(hold_lock, str(target), 60), tmp_path / "holder.log")
    lock = tmp_path / ".mg.lock"
    try:
        _wait_for(lambda: lock.exists() and lock.read_text().strip())
        assert forked(_to_mg(hf, target), tmp_path / "second.log") == 2
        assert f"pid {holder.pid} on host {owner.HOST}" in _error_line(tmp_path / "second.log")
        assert not target.exists()
    finally:
        holder.kill()
        wait_forked(holder)
    assert lock.exists()  # a stale lock, left by the killed run: taken over, and said so
    assert forked(_to_mg(hf, target), tmp_path / "third.log") == 0
    assert f"took over the lock {lock} of pid {holder.pid}" in open(tmp_path / "third.log").read()
    assert hidden(tmp_path) == []


# ------------------------------------------------------------------------------------------------------ disk full
@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs (the machine must allow mounting one: root in a container with mount rights)."""
    d = tmp_path / "disk"
    d.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(d)], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a tmpfs here ({e}): the disk-full tests need one")
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}): the disk-full tests need one")
    yield d
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _fill(disk, leave):
    """Fill ``disk`` until ``leave`` bytes are free; returns the filler file."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(free - leave, 1))
    return filler


def _assert_disk_full_line(log, *needles):
    line = _error_line(log)
    assert "the device is full (ENOSPC" in line and "the partial output was removed" in line or \
        "the partial checkpoint was removed" in line, line
    for needle in needles:
        assert needle in line, line


def test_disk_full_while_saving_a_checkpoint(small_disk, tmp_path):
    ck = small_disk / "ck"
    assert forked(_pretrain("--train-iters", 2, "--save", ck), tmp_path / "a.log") == 0
    before = digest(ck)
    _fill(small_disk, 512 * 1024)
    free = shutil.disk_usage(small_disk).free
    assert forked(_pretrain("--train-iters", 4, "--load", ck, "--save", ck), tmp_path / "b.log") == 2
    _assert_disk_full_line(tmp_path / "b.log", "model_optim_rng.pt", "still names iteration 2")
    assert digest(ck) == before and hidden(ck) == [] and hidden(small_disk) == []
    assert shutil.disk_usage(small_disk).free >= free  # the partial files are gone


@pytest.mark.parametrize("direction", ["hf2mg", "mg2hg"])
def test_disk_full_while_converting(small_disk, hf, mg, tmp_path, monkeypatch, capsys, direction):
    out = small_disk / "out"
    make = (lambda *e: _to_mg(hf, out / "mg", *e)) if direction == "hf2mg" else (lambda *e: _to_hf(mg, out, *e))
    target = out / ("mg" if direction == "hf2mg" else "mg2hg")
    assert forked(make("--params-dtype", "bf16"), tmp_path / "old.log") == 0  # an earlier output to keep
    before = digest(target)
    filler = _fill(small_disk, 256 * 1024)
    # the output size is known: refused before anything is written
    assert forked(make(), tmp_path / "refused.log") == 2
    line = _error_line(tmp_path / "refused.log")
    assert "not enough space" in line and "free" in line, line
    assert digest(target) == before and hidden(out) == []
    # a device that fills up while writing (here: the free-space check skipped, in this process) ends the same way
    monkeypatch.setattr("aquila_npu.outputs.atomic.check_free_space", lambda *a: None)
    rc, err = call_main(make().func, make().args[0], capsys)
    assert rc == 2, err
    (tmp_path / "full.log").write_text(err)
    _assert_disk_full_line(tmp_path / "full.log", "left as it was")
    assert digest(target) == before and hidden(out) == []
    filler.unlink()
    monkeypatch.undo()
    assert forked(make(), tmp_path / "ok.log") == 0


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_data_tokenizer(tmp_path_factory.mktemp("tok"))


def test_disk_full_while_preprocessing(small_disk, tokenizer, tmp_path):
    src = tmp_path / "docs.jsonl"
    rng = np.random.default_rng(0)
    words = ["quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world"]
    with open(src, "w") as f:
        for _ in range(4000):
            f.write(json.dumps({"text": " ".join(rng.choice(words, 60))}) + "\n")
    prefix = small_disk / "data" / "corpus"
    run = partial(preprocess_main, ["--input", str(src), "--tokenizer-name-or-path", str(tokenizer),
                                    "--output-prefix", str(prefix), "--log-interval", "100000"])
    assert forked(run, tmp_path / "a.log") == 0
    before = digest(small_disk / "data")
    _fill(small_disk, 64 * 1024)
    assert forked(run, tmp_path / "b.log") == 2
    _assert_disk_full_line(tmp_path / "b.log", "corpus_text_document")
    assert digest(small_disk / "data") == before and hidden(small_disk / "data") == []


# ---------------------------------------------------------------------------------------------- bad training data
@pytest.fixture(scope="module")
def dataset(tokenizer, tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    src = d / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"hello world number {i} the quick brown fox"}) + "\n"
                           for i in range(200)))
    prefix = d / "corpus"
    assert preprocess_main(["--input", str(src), "--tokenizer-name-or-path", str(tokenizer), "--output-prefix",
                            str(prefix), "--append-eod", "--log-interval", "100000"]) == 0
    return f"{prefix}_text_document"


def _copy_dataset(prefix, dst, sidecar=True):
    for ext in (".bin", ".idx") + ((".tokens.json",) if sidecar else ()):
        shutil.copy(prefix + ext, dst + ext)
    return dst


def _large_vocab_dataset(dst, sidecar):
    from aquila_npu.data.writer import IndexedDatasetsWriter

    with IndexedDatasetsWriter({"x": (dst, np.int32)}, dst) as w:
        w.add("x", np.arange(1000, 1100, dtype=np.int32), np.array([50, 50]))
    if not sidecar:
        os.remove(dst + ".tokens.json")
    return dst


def _overwrite(prefix, ext, offset, data):
    """Bytes ``data`` written over ``<prefix><ext>`` at ``offset`` (negative: from the end), as a damaged disk or a
    stray write would; the file keeps its size."""
    path = prefix + ext
    with open(path, "r+b") as f:
        f.seek(offset if offset >= 0 else os.path.getsize(path) + offset)
        f.write(data)
    return prefix


def _damaged(p, d, offset, data):
    return _overwrite(_copy_dataset(p, d + "/t"), ".idx", offset, data)


# The index layout (data/checks.py): magic 9 bytes, version u64, dtype code u8, N u64, D u64 (34 bytes), then N int32
# lengths, N int64 pointers, D int64 document indices.
_N = 200  # sequences (documents) of the ``dataset`` fixture
BAD_DATA = {
    "missing": (lambda p, d: d + "/nope_text_document", "nope_text_document.idx not found"),
    "truncated-bin": (lambda p, d: _truncate(_copy_dataset(p, d + "/t"), ".bin"), "t.bin is truncated"),
    "truncated-idx": (lambda p, d: _truncate(_copy_dataset(p, d + "/t"), ".idx"), "t.idx is truncated"),
    "larger-vocabulary": (lambda p, d: _large_vocab_dataset(d + "/big", True), "token id 1099"),
    "larger-vocabulary-scanned": (lambda p, d: _large_vocab_dataset(d + "/big", False), "token id 1099"),
    # issue 30: a damaged index used to train with exit status 0 (megatron-core's reader trusts it)
    "idx-0xff-lengths": (lambda p, d: _damaged(p, d, 38, b"\xff" * 64), "t.idx is damaged: sequence 1 has length -1"),
    "idx-0xff-pointers": (lambda p, d: _damaged(p, d, 34 + 4 * _N + 16, b"\xff" * 64),
                          "t.idx is damaged: sequence 2 starts at byte -1"),
    "idx-0xff-documents": (lambda p, d: _damaged(p, d, -64, b"\xff" * 64), "t.idx is damaged: its document indices"),
    "idx-documents-go-back": (lambda p, d: _damaged(p, d, 34 + 12 * _N + 8 * 5, (1).to_bytes(8, "little")),
                              "t.idx is damaged: document index 5 is 1, below the one before it (4)"),
    "idx-magic": (lambda p, d: _damaged(p, d, 0, b"\xff" * 64), "t.idx is not a megatron-core index"),
    "idx-version": (lambda p, d: _damaged(p, d, 9, (2).to_bytes(8, "little")), "t.idx has version 2"),
    "idx-dtype-code": (lambda p, d: _damaged(p, d, 17, b"\x09"), "t.idx has token dtype code 9"),
    "idx-counts": (lambda p, d: _damaged(p, d, 18, b"\xff" * 16), "t.idx is truncated"),
    "bin-of-another-run": (lambda p, d: _append(_copy_dataset(p, d + "/t"), ".bin", b"\x00" * 8),
                           "t.bin has "),
}


def _truncate(prefix, ext):
    os.truncate(prefix + ext, os.path.getsize(prefix + ext) - 9)
    return prefix


def _append(prefix, ext, data):
    with open(prefix + ext, "ab") as f:
        f.write(data)
    return prefix


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_training_data_is_one_line_before_any_work(dataset, tokenizer, tmp_path, capsys, case):
    make, needle = BAD_DATA[case]
    from aquila_npu.compat import journal

    prefix = make(dataset, str(tmp_path))
    journal.undo_all()
    rc, err = call_main(pretrain_main, [*TRAIN[:2], "--data-path", prefix, "--tokenizer-name-or-path", tokenizer,
                                        "--train-iters", 1, "--seq-length", 16], capsys)
    assert rc == 2 and needle in err, err
    assert "aquila_npu.pretrain: error: --data-path" in err
    assert not journal.applied()  # refused before any work: the device was never set up


def test_good_training_data_passes_the_checks(dataset, tokenizer):
    from aquila_npu.data import checks

    checks.check([dataset], 500)
    assert checks.max_token_id(dataset) == json.load(open(dataset + ".tokens.json"))["max_token_id"]
    os.rename(dataset + ".tokens.json", dataset + ".tokens.json.aside")
    try:  # without the sidecar the .bin is scanned, to the same answer
        assert checks.max_token_id(dataset) == json.load(open(dataset + ".tokens.json.aside"))["max_token_id"]
    finally:
        os.rename(dataset + ".tokens.json.aside", dataset + ".tokens.json")


@pytest.mark.parametrize("flags,needle", [
    (["--seq-length", -5], "--seq-length -5 must be >= 1"),
    (["--lr", -1], "--lr -1.0 must be >= 0"),
    (["--split", "a,b,c"], "--split a,b,c"),
    (["--train-iters", 0], "--train-iters 0 must be >= 1"),
    (["--save", "FILE"], "is a file, not a checkpoint directory"),
    (["--exit-duration-in-mins", 0], "--exit-duration-in-mins 0.0 must be > 0"),
], ids=["seq-length", "lr", "split", "train-iters", "save-file", "exit-duration"])
def test_bad_training_flags_are_one_line(tmp_path, capsys, flags, needle):
    (tmp_path / "FILE").write_text("x")
    flags = [str(tmp_path / "FILE") if f == "FILE" else f for f in flags]
    base = [*TRAIN, "--train-iters", 1]
    rc, err = call_main(pretrain_main, [*base, *flags], capsys)
    assert rc == 2 and needle in err, err


@pytest.mark.parametrize("flags,needle", [
    (["--make-vocab-size-divisible-by", 0], "--make-vocab-size-divisible-by 0 must be >= 1"),
    (["--max-shard-size-gb", 0], "--max-shard-size-gb 0.0 must be > 0"),
], ids=["make-vocab-size-divisible-by", "max-shard-size-gb"])
def test_bad_conversion_flags_are_one_line(hf, tmp_path, capsys, flags, needle):
    rc, err = call_main(convert_main, ["--loader", "llama2_hf", "--saver", "megatron", "--load-dir", hf,
                                       "--save-dir", tmp_path / "out", *flags], capsys)
    assert rc == 2 and needle in err, err
    assert not (tmp_path / "out").exists() and hidden(tmp_path) == []


# ---------------------------------------------------------------------------------------------- issue 30: symlinks
def _symlink(tmp_path, real, name="link"):
    link = tmp_path / name
    os.symlink(real, link)
    return link


def _holding(target, tmp_path):
    """A child holding ``target``'s output lock (as a run writing it would), once it holds it."""
    holder = start_forked(partial(hold_lock, str(target), 120), tmp_path / "holder.log")
    lock = target.parent / f".{target.name}.lock"
    _wait_for(lambda: lock.exists() and lock.read_text().strip())
    return holder


def _documents(path, n=50):
    path.write_text("".join(json.dumps({"text": f"hello world number {i} the quick brown fox"}) + "\n"
                            for i in range(n)))
    return path


@pytest.mark.parametrize("command", ["pretrain --save", "convert --save-dir", "preprocess --output-prefix"])
def test_a_second_writer_through_a_symlink_is_refused(hf, tokenizer, tmp_path, command):
    """Locks are taken on the resolved path: a run reaching a target through a symlink meets the lock of the run
    writing the target itself (issue 30: ``--save cklink`` replaced the first run's iterations)."""
    if command.startswith("preprocess"):
        real = tmp_path / "data"
        real.mkdir()
        target, given = real / "corpus", _symlink(tmp_path, real) / "corpus"  # a symlinked folder of the prefix
        run = partial(preprocess_main, ["--input", str(_documents(tmp_path / "docs.jsonl")), "--tokenizer-name-or-path",
                                        str(tokenizer), "--output-prefix", str(given), "--log-interval", "100000"])
        outputs = real
    else:
        target = tmp_path / "out"
        target.mkdir()
        given = _symlink(tmp_path, target)
        run = _pretrain("--train-iters", 2, "--save", given) if command.startswith("pretrain") else _to_mg(hf, given)
        outputs = target
    holder = _holding(target, tmp_path)
    try:
        assert forked(run, tmp_path / "second.log") == 2
        line = _error_line(tmp_path / "second.log")
        assert f"pid {holder.pid} on host {owner.HOST}" in line, line
        assert f"{given} (= {target})" in line, line  # the message names the target as given and where it leads
        assert [e for e in os.listdir(outputs) if not e.startswith(".")] == []  # nothing written
    finally:
        holder.kill()
        wait_forked(holder)


def test_a_symlinked_output_is_written_where_it_leads(hf, mg, hf_state, tmp_path):
    """``--save-dir link`` (a symlink to a folder) used to write the checkpoint, replace the symlink with a folder,
    leave its target empty and exit 2 (``Cannot call rmtree on a symbolic link``). The output goes where the symlink
    leads; the symlink stays."""
    (tmp_path / "real").mkdir()
    link = _symlink(tmp_path, tmp_path / "real")
    for _ in range(2):  # a new output, then one replacing it
        assert forked(_to_mg(hf, link), tmp_path / "c.log") == 0, open(tmp_path / "c.log").read()[-2000:]
        assert os.path.islink(link) and os.path.realpath(link) == str(tmp_path / "real")
        _assert_converted(tmp_path / "real", hf_state, True)
        assert hidden(tmp_path) == [] and hidden(tmp_path / "real") == []
    # Megatron -> HF into <save-dir>/mg2hg through a symlinked --save-dir
    (tmp_path / "hfout").mkdir()
    hflink = _symlink(tmp_path, tmp_path / "hfout", "hflink")
    assert forked(_to_hf(mg, hflink), tmp_path / "h.log") == 0, open(tmp_path / "h.log").read()[-2000:]
    _assert_converted(tmp_path / "hfout" / "mg2hg", hf_state, False)
    assert os.path.islink(hflink) and hidden(tmp_path) == [] and hidden(tmp_path / "hfout") == []
    # a training --save through a symlink: the checkpoint lands in the target
    (tmp_path / "ck").mkdir()
    cklink = _symlink(tmp_path, tmp_path / "ck", "cklink")
    assert forked(_pretrain("--train-iters", 2, "--save", cklink), tmp_path / "t.log") == 0
    assert CheckpointInfo.read(str(tmp_path / "ck")).iteration == 2 and os.path.islink(cklink)
    assert hidden(tmp_path) == [] and hidden(tmp_path / "ck") == []
    # a single output file (generate / evaluate --output, selfcheck --out) through a symlink
    from aquila_npu.outputs.files import write_text

    (tmp_path / "result.json").write_text("old")
    filelink = _symlink(tmp_path, tmp_path / "result.json", "result-link.json")
    write_text(str(filelink), "new", "the result")
    assert os.path.islink(filelink) and (tmp_path / "result.json").read_text() == "new"


# ------------------------------------------------------------------------------ issue 30: one line, before any work
def _one_line(err):
    """Exactly one line on stderr, the error (no usage block, no traceback)."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and ": error: " in lines[0], err[-3000:]
    return lines[0]


@pytest.mark.parametrize("argv,needle", [
    ([*TRAIN, "--train-iters", 1, "--micro-batch-size", 0], "--micro-batch-size must be >= 1"),
    ([*TRAIN, "--train-iters", 1, "--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    ([*TRAIN, "--train-iters", 1, "--load", "FILE"], "is a file, not a checkpoint directory"),
    (["--model", "aquila2-tiny", "--train-iters", 1, "--data-path", "corpus_text_document"],
     "--tokenizer-name-or-path is required with --data-path"),
], ids=["micro-batch-size-0", "lr-abc", "load-a-file", "data-path-without-tokenizer"])
def test_pretrain_argument_errors_are_exactly_one_line(tmp_path, capsys, argv, needle):
    """Issue 30 saw argparse's 70-line usage block before these; they are one line, exit status 2."""
    (tmp_path / "FILE").write_text("x")
    argv = [str(tmp_path / "FILE") if a == "FILE" else a for a in argv]
    rc, err = call_main(pretrain_main, argv, capsys)
    assert rc == 2 and needle in _one_line(err), err


def test_selfcheck_against_the_hf_folder_of_another_model_is_one_line(mg, tmp_path, capsys):
    """It used to fail deep in the comparison (``RuntimeError: The size of tensor a ...``)."""
    from aquila_npu.cli.selfcheck import main as selfcheck_main
    from aquila_npu.compat import journal
    from aquila_npu.models.registry import get_model_spec

    other = tmp_path / "other"
    tiny_llama(get_model_spec("aquila2-tiny")).save_pretrained(other)
    capsys.readouterr()  # save_pretrained's progress bar
    journal.undo_all()
    rc, err = call_main(selfcheck_main, ["--load", mg, "--hf-dir", other, "--device", "cpu"], capsys)
    line = _one_line(err)
    assert rc == 2 and f"--hf-dir {other} is another model than the --load checkpoint {mg}" in line, line
    assert "intermediate_size 176 vs 96" in line, line  # what differs
    assert not journal.applied()  # refused before the device was set up


def test_preprocess_output_prefix_naming_a_folder_is_refused(tokenizer, tmp_path, capsys):
    """``--output-prefix DIR/`` wrote ``DIR/_text_document.*``."""
    src = _documents(tmp_path / "docs.jsonl")
    for prefix in (f"{tmp_path / 'out'}/", f"{tmp_path / 'out'}/.", f"{tmp_path / 'out'}/.."):
        rc, err = call_main(preprocess_main, ["--input", src, "--tokenizer-name-or-path", tokenizer,
                                              "--output-prefix", prefix], capsys)
        assert rc == 2 and f"--output-prefix {prefix}: names a folder" in _one_line(err), err
    assert not (tmp_path / "out").exists() and not [e for e in os.listdir(tmp_path) if "_document" in e]


# ------------------------------------------------------------------------- issue 30: no output before good inputs
@pytest.fixture(scope="module")
def bad_resumes(hf, tmp_path_factory):
    """Inputs found bad only at load time: a tp2 conversion (loaded by one process), a LoRA adapter of another
    model than the base, a distributed-optimizer training checkpoint."""
    from aquila_npu.lora.convert import import_peft
    from aquila_npu.models.registry import get_model_spec
    from aquila_npu.testing.tiny_hf import tiny_peft
    from aquila_npu.weights.mapping import Layout

    d = tmp_path_factory.mktemp("bad-resumes")
    to_megatron(HFReader(str(hf)), str(d / "tp2"), 2, 1)
    other = get_model_spec("aquila2-tiny")
    tiny_peft(["q_proj", "v_proj"], spec=other).save_pretrained(d / "peft")
    import_peft(str(d / "peft"), str(d / "adapter"), Layout(other, 1, 1))
    assert forked(_pretrain("--train-iters", 1, "--save", d / "distopt", "--use-distributed-optimizer"),
                  d / "distopt.log") == 0
    return d


# needs the training/run.py change (the load checks before SaveDir.claim): until then each leaves an empty --save
@pytest.mark.parametrize("case", ["tp2-load-on-one-process", "lora-adapter-of-another-model",
                                  "distributed-optimizer-checkpoint-without-the-flag"])
def test_bad_load_inputs_leave_no_save_directory(bad_resumes, mg, tmp_path, case):
    common = ["--mock-data", "--micro-batch-size", 2, "--seq-length", 32, "--lr", 1e-3, "--train-iters", 2]
    argv, needle = {
        "tp2-load-on-one-process": ([*common, "--load", bad_resumes / "tp2"], "is tp2-pp1, but this run is tp1-pp1"),
        "lora-adapter-of-another-model": ([*common, "--load", mg, "--lora-load", bad_resumes / "adapter"],
                                          "is for another model"),
        "distributed-optimizer-checkpoint-without-the-flag": (
            [*TRAIN, "--train-iters", 2, "--load", bad_resumes / "distopt"], "saved with --use-distributed-optimizer"),
    }[case]
    save = tmp_path / "runs" / "ck"
    call = partial(pretrain_main, [str(a) for a in [*argv, "--save", save]])
    assert forked(call, tmp_path / "log") == 2
    assert needle in _error_line(tmp_path / "log")
    assert not save.exists(), "an empty --save was left behind"
    assert hidden(tmp_path / "runs") == []  # no lock left either


def test_bad_load_inputs_are_found_from_the_metadata(bad_resumes, mg):
    """The checks the run makes before it claims --save (``CheckpointInfo.check_resume``, ``lora.training.check``)
    find each bad input from the checkpoints' metadata alone (no device, no process group)."""
    import argparse

    from aquila_npu.errors import CheckpointError
    from aquila_npu.lora import training as lora_training
    from aquila_npu.weights.mapping import Layout

    tp2 = CheckpointInfo.read(str(bad_resumes / "tp2"))
    one = Layout(tp2.spec, 1, 1)
    flags = dict(finetune=False, no_load_optim=False, use_distributed_optimizer=False, data_parallel_size=1)
    with pytest.raises(CheckpointError, match="is tp2-pp1, but this run is tp1-pp1"):
        tp2.check_resume(one, **flags)
    distopt = CheckpointInfo.read(str(bad_resumes / "distopt"))
    assert distopt.distributed_optimizer and distopt.data_parallel_size == 1
    with pytest.raises(CheckpointError, match="saved with --use-distributed-optimizer"):
        distopt.check_resume(distopt.layout, **flags)
    distopt.check_resume(distopt.layout, **{**flags, "use_distributed_optimizer": True})
    distopt.check_resume(distopt.layout, **{**flags, "no_load_optim": True})
    base = CheckpointInfo.read(str(mg))
    args = argparse.Namespace(load=str(mg), lora_load=str(bad_resumes / "adapter"), finetune=False,
                              no_load_optim=False, use_distributed_optimizer=False)
    with pytest.raises(CheckpointError, match="is for another model"):
        lora_training.check(args, base, base.layout, 1)


# ---------------------------------------------------------------- issue 30: an iteration placed, the tracker not moved
def test_an_iteration_the_tracker_does_not_name_is_kept_and_named(straight, tmp_path):
    """A kill between putting ``iter_0000004`` in place and moving the tracker leaves a complete iteration that the
    tracker does not name. The rule (``megatron_io.note_unnamed_iterations``): it is kept (complete, and possibly
    one the user set the tracker back from) and named in one line."""
    from aquila_npu.checkpoint import megatron_io

    ck = tmp_path / "ck"
    shutil.copytree(straight / "ck", ck)
    (ck / "latest_checkpointed_iteration.txt").write_text("2")
    assert megatron_io.unnamed_iterations(str(ck)) == ["iter_0000004", "iter_0000006"]
    lines = []
    assert megatron_io.note_unnamed_iterations(str(ck), say=lines.append) == ["iter_0000004", "iter_0000006"]
    assert len(lines) == 2 and lines[0].startswith(f"kept {ck / 'iter_0000004'}: it is newer than iteration 2")
    (ck / "latest_checkpointed_iteration.txt").unlink()
    assert megatron_io.unnamed_iterations(str(ck)) == ["iter_0000002", "iter_0000004", "iter_0000006"]
    assert megatron_io.unnamed_iterations(str(tmp_path / "none")) == []


# needs the training/checkpointing.py change (SaveDir.claim names them after owner.claim)
def test_the_next_run_names_the_unnamed_iteration_and_replaces_it_by_its_own_save(straight, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(straight / "ck", ck)
    (ck / "latest_checkpointed_iteration.txt").write_text("2")  # as a kill before the tracker of iteration 4 leaves
    shutil.rmtree(ck / "iter_0000006")
    resume = ["--train-iters", 6, "--load", ck, "--save", ck, "--save-interval", 2, "--metrics-file",
              tmp_path / "m.jsonl"]
    assert forked(_pretrain(*resume), tmp_path / "rerun.log") == 0
    log = open(tmp_path / "rerun.log").read()
    assert f"kept {ck / 'iter_0000004'}: it is newer than iteration 2" in log, log[-3000:]
    assert _losses(tmp_path / "m.jsonl") == _losses(straight / "m.jsonl")[2:]
    assert CheckpointInfo.read(str(ck)).iteration == 6 and hidden(ck) == []
