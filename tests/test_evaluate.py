"""BoolQ evaluation vs lm-evaluation-harness (run locally on the HF model) and vs Hugging Face logits.

lm-eval 0.4.13 runs offline in a subprocess on a BoolQ-format jsonl through a task YAML with the boolq prompt; our
accuracy and every prediction must equal its, at tp1-pp1 and tp2-pp2. ModelLink's first-token scoring is checked
against the next-token logits of the HF model built from its config in this process.
"""

import glob
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from aquila_npu.testing.lm_eval_tasks import write_boolq_task
from aquila_npu.testing.tiny_hf import tiny_llama
from helpers import assert_help_documents_every_flag, build_assets, call_main, child_env, read_json, torchrun, words


def write_boolq(folder, n_files=2, rows=14, seed=1):
    """BoolQ-format rows (question, title, answer, passage) in several files; one passage longer than the tiny
    model's 128 positions (left-truncated, as lm-eval does)."""
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    files = []
    for k in range(n_files):
        path = os.path.join(folder, f"part{k}.jsonl")
        with open(path, "w") as f:
            for i in range(rows):
                n = 120 if (k, i) == (0, 3) else rng.randint(8, 30)
                f.write(json.dumps({"question": words(rng, rng.randint(3, 7)), "title": words(rng, 2),
                                    "answer": rng.random() < 0.6,
                                    "passage": words(rng, n).capitalize() + "."}) + "\n")
        files.append(path)
    return files


@pytest.fixture(scope="module")
def setup_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    assets = build_assets(str(root))
    files = write_boolq(str(root / "boolq"))
    return assets, str(root / "boolq"), files, root


@pytest.fixture(scope="module")
def lm_eval_reference(setup_data):
    """lm-eval's per-example (log p(' no'), log p(' yes'), correct) and accuracy on the HF model."""
    assets, _, files, root = setup_data
    tasks = root / "lmeval_tasks"
    tasks.mkdir()
    write_boolq_task(tasks, "boolq_local", files)
    out = root / "lmeval_out"
    env = child_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                         HF_DATASETS_CACHE=str(root / "hf_datasets_cache"))
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={assets['hf']},dtype=float32", "--tasks", "boolq_local", "--include_path",
                           str(tasks), "--device", "cpu", "--batch_size", "4", "--output_path", str(out),
                           "--log_samples"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    samples = [json.loads(line) for line in open(glob.glob(str(out / "*" / "samples_boolq_local_*.jsonl"))[0])]
    samples.sort(key=lambda s: s["doc_id"])
    results = json.load(open(glob.glob(str(out / "*" / "results_*.json"))[0]))
    rows = [(float(s["filtered_resps"][0][0]), float(s["filtered_resps"][1][0]), bool(s["acc"])) for s in samples]
    assert "Truncating" in proc.stderr  # the long row was left-truncated
    return rows, results["results"]["boolq_local"]["acc,none"]


def _evaluate(assets, data, tmp_path, tp, pp, *flags, dp=1):
    out = tmp_path / f"boolq-{tp}{pp}.json"
    proc = torchrun("-m aquila_npu.evaluate", tp * pp * dp,
                    ["--task", "boolq", "--task-data-path", data, "--load", assets[tp, pp],
                     "--tokenizer-name-or-path", assets["hf"], "--micro-batch-size", 4, "--output", out, *flags])
    return proc, read_json(out)


def _check_against_lm_eval(report, reference):
    rows, acc = reference
    preds = report["records"]
    assert len(preds) == len(rows) == report["total"] == 28
    assert [p["correct"] for p in preds] == [c for _, _, c in rows]
    assert report["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert report["correct"] == sum(c for _, _, c in rows)
    for p, (no, yes, _) in zip(preds, rows):
        assert p["logprob_no"] == pytest.approx(no, abs=1e-4) and p["logprob_yes"] == pytest.approx(yes, abs=1e-4)
        assert p["prediction"] == (yes > no)


def test_loglikelihood_tp1_pp1_equals_lm_eval(setup_data, lm_eval_reference, tmp_path):
    assets, data, files, _ = setup_data
    proc, report = _evaluate(assets, data, tmp_path, 1, 1)
    assert report["scoring"] == "loglikelihood"
    _check_against_lm_eval(report, lm_eval_reference)
    assert sorted(report["per_file"]) == files and all(v["total"] == 14 for v in report["per_file"].values())
    assert f"accuracy {report['accuracy']:.4f} ({report['correct']}/28 correct)" in proc.stdout


@pytest.mark.slow
def test_loglikelihood_tp2_pp2_equals_lm_eval(setup_data, lm_eval_reference, tmp_path):
    assets, data, _, _ = setup_data
    _, report = _evaluate(assets, data, tmp_path, 2, 2)
    _check_against_lm_eval(report, lm_eval_reference)


def test_first_token_scoring_equals_hf_next_token_logits(setup_data, tmp_path):
    """ModelLink's scoring: log-softmax of the logits after the prompt at encode("Yes")[-1] vs encode("No")[-1].
    Two data-parallel replicas share the rows."""
    from transformers import AutoTokenizer

    from aquila_npu.evaluation.boolq import BoolQ, prompt

    assets, data, _, _ = setup_data
    _, report = _evaluate(assets, data, tmp_path, 1, 1, "--scoring", "first-token", dp=2)
    tok = AutoTokenizer.from_pretrained(assets["hf"])
    yes, no = tok.encode("Yes")[-1], tok.encode("No")[-1]
    model = tiny_llama()
    docs = BoolQ().load(data)
    assert report["scoring"] == "first-token" and len(report["records"]) == len(docs)
    for d, p in zip(docs, report["records"]):
        ids = torch.tensor([tok.encode(prompt(d))[-128:]])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0, -1].float(), -1)
        assert p["logprob_yes"] == pytest.approx(lp[yes].item(), abs=1e-4)
        assert p["logprob_no"] == pytest.approx(lp[no].item(), abs=1e-4)
        assert p["prediction"] == bool(lp[yes] >= lp[no]) and p["correct"] == (p["prediction"] == d["answer"])


def _entry(args, capsys):
    from aquila_npu.cli.evaluate import main

    return call_main(main, args, capsys)


@pytest.mark.parametrize("content,message", [
    ('{"question": "q", "passage": "p", "answer": true}\n{"question": "q", "passage": "p"\n', "line 2: invalid JSON"),
    ('{"question": "q", "passage": "p", "answer": true}\n\n{"question": "q", "passage": "p"}\n', "line 3: no 'answer'"),
    ('{"question": "q", "passage": "p", "answer": "yes"}\n', "line 1: 'answer' is 'yes', expected true or false"),
    ('{"question": "", "passage": "p", "answer": true}\n', "line 1: 'question' is missing"),
    ('[1, 2]\n', "line 1: expected a JSON object"),
])
def test_malformed_rows_are_clear_errors(setup_data, tmp_path, capsys, content, message):
    assets = setup_data[0]
    bad = tmp_path / "dev.jsonl"
    bad.write_text(content)
    rc, err = _entry(["--task", "boolq", "--task-data-path", bad, "--load", assets[1, 1], "--tokenizer-name-or-path",
                      assets["hf"]], capsys)
    assert rc == 2 and str(bad) in err and message in err, err


def test_bad_paths_and_flags(setup_data, tmp_path, capsys):
    assets = setup_data[0]
    common = ["--task", "boolq", "--tokenizer-name-or-path", assets["hf"]]
    rc, err = _entry([*common, "--task-data-path", tmp_path, "--load", assets[1, 1]], capsys)
    assert rc == 2 and "no .jsonl or .json files" in err
    rc, err = _entry([*common, "--task-data-path", tmp_path / "nope", "--load", assets[1, 1]], capsys)
    assert rc == 2 and "no such file or folder" in err
    (tmp_path / "d.jsonl").write_text('{"question": "q", "passage": "p", "answer": true}\n')
    rc, err = _entry([*common, "--task-data-path", tmp_path, "--load", tmp_path / "ckpt"], capsys)
    assert rc == 2 and "--load" in err
    rc, err = _entry([*common, "--task-data-path", tmp_path, "--load", assets[1, 1], "--scoring", "exact"], capsys)
    assert rc == 2 and "loglikelihood, first-token" in err
    rc, err = _entry(["--task", "nosuchtask", "--task-data-path", tmp_path, "--load", assets[1, 1],
                      "--tokenizer-name-or-path", assets["hf"]], capsys)
    assert rc == 2 and "--task" in err


def test_outputs_that_are_folders_are_refused_before_any_work(tmp_path, capsys):
    """Issue 30: ``--output`` naming a folder ended in IsADirectoryError after the whole evaluation; an
    ``--output-dir`` whose ``<task>.json`` is a folder likewise. Both are one line before any work: here the data,
    checkpoint and tokenizer do not even exist, and the output is what is named."""
    (tmp_path / "out").mkdir()
    missing = ["--task", "boolq", "--task-data-path", tmp_path / "nodata", "--load", tmp_path / "nockpt",
               "--tokenizer-name-or-path", tmp_path / "notok"]
    rc, err = _entry([*missing, "--output", tmp_path / "out"], capsys)
    assert rc == 2 and f"--output {tmp_path / 'out'}: is a folder" in err, err
    (tmp_path / "out" / "boolq.json").mkdir()
    rc, err = _entry([*missing, "--output-dir", tmp_path / "out"], capsys)
    assert rc == 2 and f"--output-dir {tmp_path / 'out'}: {tmp_path / 'out' / 'boolq.json'} is a folder" in err, err
    (tmp_path / "file").write_text("x")
    rc, err = _entry([*missing, "--output-dir", tmp_path / "file"], capsys)
    assert rc == 2 and "is a file, not a folder" in err, err


def test_help_documents_every_flag():
    from aquila_npu.cli.evaluate import build_parser

    assert_help_documents_every_flag(build_parser())


DUMMY_TASK = """
from aquila_npu.evaluation import tasks


class Dummy(tasks.Task):
    name = "dummy-test-task"

    def load(self, path, limit=None):
        return [{"file": path, "line": 1}]

    def score(self, docs, scorer, scoring):
        return [{"file": d["file"], "line": d["line"], "correct": True} for d in docs]
"""


def test_task_registry_is_extensible(tmp_path, monkeypatch):
    """A task is a Task subclass in a module listed once in TASK_MODULES."""
    from aquila_npu.evaluation import tasks

    assert "boolq" in tasks.load_tasks()
    assert tasks.get_task("BoolQ").scorings == ("loglikelihood", "first-token")
    (tmp_path / "dummy_task_module.py").write_text(DUMMY_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(tasks, "TASK_MODULES", tasks.TASK_MODULES + ("dummy_task_module",))
    t = tasks.get_task("dummy-test-task")
    assert tasks.summarize(t.score(t.load("x"), None, "loglikelihood"))["accuracy"] == 1.0


def test_real_boolq_dev_and_tokenizer(shared_data):
    """The real BoolQ dev split loads (3270 rows, 2033 true) and the real Aquila2 tokenizer gives ModelLink's
    single-token "Yes"/"No" and lm-eval's single-token " yes"/" no" continuations on a real prompt."""
    from transformers import AutoTokenizer

    from aquila_npu.evaluation.boolq import BoolQ, prompt
    from aquila_npu.evaluation.scoring import Scorer

    docs = BoolQ().load(str(shared_data / "boolq"))
    assert len(docs) == 3270 and sum(d["answer"] for d in docs) == 2033
    tok = AutoTokenizer.from_pretrained(shared_data / "aquila2-tokenizer")
    scorer = Scorer(None, tok, vocab_size=100008, max_length=2048, batch_size=1, device="cpu")
    ctx, cont = scorer.encode_pair(prompt(docs[0]), " yes")
    assert ctx == tok.encode(prompt(docs[0])) and len(cont) == 1
    assert len(scorer.encode_pair(prompt(docs[0]), " no")[1]) == 1
    assert [len(tok.encode(w)) for w in ("Yes", "No")] == [1, 1]
    assert max(len(tok.encode(prompt(d))) for d in docs) < 2048  # no truncation at Aquila2-7B's 2048 positions
