"""``python -m aquila_npu.demo``: the whole job on a CPU in minutes, with the commands users run on NPUs, each as a
subprocess that prints what it runs (the steps: ``aquila_npu.cli.demo``). A step that fails, or held-out accuracy
not clearly above chance, ends the demo with ``CheckFailed`` (exit status 1)."""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aquila_npu.data.bpe import train_tokenizer
from aquila_npu.errors import CheckFailed
from aquila_npu.launch import PACKAGE_ROOT, torchrun
from aquila_npu.outputs.files import write_text

ROOT = Path(PACKAGE_ROOT)  # the checkout: tools/ lives there
THINGS = ["apple", "sky", "grass", "snow", "coal", "sun", "rose", "sea", "cloud", "leaf", "milk", "fire", "frog",
          "lemon", "plum", "ink", "salt", "gold", "brick", "mint", "ash", "corn", "rust", "pearl"]
COLORS = ["red", "blue", "green", "white", "black", "yellow", "pink", "grey", "orange", "purple", "brown"]
PASS_ACCURACY = 0.75


def make_data(root: Path, n_train: int, n_eval: int, seed: int = 0):
    """Training documents (a passage, the BoolQ prompt, the answer) and held-out BoolQ rows. The question never tells
    the answer ("is the frog pink" is asked of "The frog is pink." and of "The frog is not pink."): the passage does.
    No (passage, question) pair of the held-out set occurs in training."""
    rng = random.Random(seed)
    combos = [(t, c, neg) for t in THINGS for c in COLORS for neg in (False, True)]
    rng.shuffle(combos)
    held_out, seen = combos[:n_eval], combos[n_eval:]

    def row(thing, color, negated):
        passage = f"The {thing} is {'not ' if negated else ''}{color}."
        return {"question": f"is the {thing} {color}", "passage": passage, "answer": not negated, "title": thing}

    dev = [row(*c) for c in held_out]
    train = []
    for _ in range(n_train):
        r = row(*rng.choice(seen))
        train.append({"text": f"{r['passage']}\nQuestion: {r['question']}?\nAnswer: {'yes' if r['answer'] else 'no'}"})
    (root / "data").mkdir(parents=True)
    (root / "boolq").mkdir()
    for path, rows in ((root / "data" / "train.jsonl", train), (root / "boolq" / "dev.jsonl", dev)):
        write_text(str(path), "".join(json.dumps(r) + "\n" for r in rows), "the demo data")
    return train, dev


class Steps:
    def __init__(self):
        self.n, self.start = 0, time.time()

    def run(self, title: str, cmd: list, cwd: Path, quiet: bool = True) -> str:
        self.n += 1
        shown = " ".join(shlex.quote(str(c)) for c in cmd).replace(sys.executable, "python")
        print(f"\n[{self.n}] {title}\n    $ {shown}", flush=True)
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   PYTHONWARNINGS="ignore", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        t = time.time()
        err_file = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty stderr cannot block the step
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=err_file,
                                text=True)
        lines = []
        for line in proc.stdout:  # live, so long steps show progress
            if line.strip():
                lines.append(line.rstrip())
                if not quiet:
                    print("    " + lines[-1], flush=True)
        rc = proc.wait()
        err_file.seek(0)
        err = err_file.read()
        err_file.close()
        if rc:
            print("\n".join(lines[-40:]), err[-4000:], sep="\n")
            raise CheckFailed(f"step {self.n} ({title}) failed with exit code {proc.returncode}")
        if quiet:
            for ln in lines[-3:]:
                print("    " + ln)
        print(f"    done in {time.time() - t:.0f}s", flush=True)
        return "\n".join(lines)

    def note(self, title: str, text: str):
        self.n += 1
        print(f"\n[{self.n}] {title}\n    {text}", flush=True)


def run(a) -> int:
    iters = a.train_iters or (20 if a.short else 400)
    work = Path(a.workdir).resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    py, steps = sys.executable, Steps()
    train, dev = make_data(work, n_train=4000, n_eval=64 if a.short else 200)
    steps.note("synthetic data", f"{len(train)} training documents in {work / 'data/train.jsonl'}, {len(dev)} held-out "
                                 f"BoolQ rows in {work / 'boolq/dev.jsonl'}; e.g.\n    "
                                 + train[0]["text"].replace("\n", "\n    "))
    hf = work / "model_from_hf" / "Aquila2-tiny"
    train_tokenizer(str(hf), (r["text"] for r in train), vocab_size=400)
    steps.note("tokenizer", f"byte-level BPE, 400 tokens, saved in {hf}")
    steps.run("preprocess the corpus into a megatron-core indexed dataset",
              [py, ROOT / "tools/preprocess_data.py", "--input", "data/train.jsonl", "--tokenizer-name-or-path", hf,
               "--output-prefix", "dataset/demo", "--tokenizer-type", "PretrainedFromHF", "--append-eod",
               "--workers", "1", "--log-interval", "10000"], work)
    steps.run(f"pretrain aquila2-tiny from scratch on the CPU ({iters} iterations)",
              [py, "-m", "aquila_npu.pretrain", "--device", "cpu", "--model", "aquila2-tiny",
               "--data-path", "dataset/demo_text_document", "--split", "100,0,0", "--tokenizer-name-or-path", hf,
               "--seq-length", 64, "--micro-batch-size", 16, "--global-batch-size", 16, "--train-iters", iters,
               "--lr", 3e-3, "--min-lr", 3e-4, "--lr-decay-style", "cosine", "--lr-warmup-fraction", 0.05,
               "--weight-decay", 0.01, "--clip-grad", 1.0, "--log-interval", max(iters // 8, 1),
               "--save", "ckpt/aquila2-tiny-tp1-pp1", "--metrics-file", "ckpt/metrics.jsonl"], work, quiet=False)
    steps.run("convert Megatron -> Hugging Face (written to model_from_hf/Aquila2-tiny/mg2hg/)",
              [py, ROOT / "tools/checkpoint/convert_ckpt.py", "--model-type", "GPT", "--loader", "megatron",
               "--saver", "megatron", "--save-model-type", "save_huggingface_llama",
               "--load-dir", "ckpt/aquila2-tiny-tp1-pp1", "--save-dir", hf], work)
    steps.run("convert Hugging Face -> Megatron tp2-pp1",
              [py, ROOT / "tools/checkpoint/convert_ckpt.py", "--model-type", "GPT", "--loader", "llama2_hf",
               "--saver", "megatron", "--load-dir", hf / "mg2hg", "--save-dir", "model_weights/aquila2-tiny-tp2-pp1",
               "--target-tensor-parallel-size", 2, "--target-pipeline-parallel-size", 1,
               "--tokenizer-model", hf / "mg2hg" / "tokenizer.json"], work)
    launch = torchrun(2)
    example = dev[0]
    prompt = f"{example['passage']}\nQuestion: {example['question']}?\nAnswer:"
    steps.run("generate (greedy, KV cache) from the tp2 checkpoint on 2 processes",
              launch + ["-m", "aquila_npu.generate", "--device", "cpu", "--load", "model_weights/aquila2-tiny-tp2-pp1",
                        "--tokenizer-name-or-path", hf / "mg2hg", "--tensor-model-parallel-size", 2,
                        "--prompt", prompt, "--max-new-tokens", 2, "--greedy", "--output", "generated.jsonl"],
              work)
    with open(work / "generated.jsonl") as f:
        print(f"    held-out question: {prompt!r} -> {json.loads(f.readline())['text']!r} "
              f"(answer: {'yes' if example['answer'] else 'no'})")
    launch = torchrun(2)
    steps.run("evaluate on the held-out yes/no questions with the BoolQ evaluator (lm-eval's log-likelihood scoring)",
              launch + ["-m", "aquila_npu.evaluate", "--device", "cpu", "--task", "boolq",
                        "--task-data-path", "boolq/dev.jsonl", "--load", "model_weights/aquila2-tiny-tp2-pp1",
                        "--tokenizer-name-or-path", hf / "mg2hg", "--tensor-model-parallel-size", 2,
                        "--output", "boolq_result.json", "--no-progress"], work)
    with open(work / "boolq_result.json") as f:
        accuracy = json.load(f)["accuracy"]
    verdict = "short run: accuracy not checked" if a.short else \
        ("clearly above chance" if accuracy >= PASS_ACCURACY else f"NOT above {PASS_ACCURACY:.0%}")
    print(f"\ndemo: BoolQ-format accuracy {accuracy:.1%} on {len(dev)} held-out questions (chance 50%): {verdict}; "
          f"total {time.time() - steps.start:.0f}s; everything is in {work}")
    if not (a.short or accuracy >= PASS_ACCURACY):
        raise CheckFailed(f"BoolQ-format accuracy {accuracy:.1%} is not above {PASS_ACCURACY:.0%}; everything is in "
                          f"{work}")
    return 0
