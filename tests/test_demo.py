"""The one-command CPU demo (issue 6): every step runs from a clean directory (short mode, as CI runs it), and its
held-out questions really are held out."""

import json

import pytest

from helpers import ROOT, run_module


def test_held_out_questions_never_appear_in_training(tmp_path):
    from aquila_npu.jobs.demo import make_data

    train, dev = make_data(tmp_path, n_train=2000, n_eval=200)
    by_passage = {}
    for r in train:
        passage, *questions = r["text"].split("\n")
        by_passage.setdefault(passage, set()).update(q for q in questions if q.startswith("Question:"))
    for row in dev:
        assert f"Question: {row['question']}?" not in by_passage.get(row["passage"], ())
    assert 0.35 < sum(r["answer"] for r in dev) / len(dev) < 0.65  # balanced: chance is about 50%
    rows = [json.loads(line) for line in open(tmp_path / "boolq" / "dev.jsonl")]
    assert set(rows[0]) == {"question", "passage", "answer", "title"}


def test_help_names_the_quick_pass():
    """``python -m aquila_npu.demo`` reaches the command (the run itself is the slow test below)."""
    proc = run_module("aquila_npu.demo", "--help", cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "--short" in proc.stdout and "--workdir" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.slow
def test_demo_short_mode_runs_every_step(tmp_path):
    proc = run_module("aquila_npu.demo", "--short", "--workdir", tmp_path / "demo", cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for step in ("preprocess", "pretrain", "Megatron -> Hugging Face", "Hugging Face -> Megatron tp2", "generate",
                 "evaluate"):
        assert step in out, step
    result = json.load(open(tmp_path / "demo" / "boolq_result.json"))
    assert result["total"] == len(result["records"]) == 64
    assert (tmp_path / "demo/model_from_hf/Aquila2-tiny/mg2hg/model.safetensors").exists()
