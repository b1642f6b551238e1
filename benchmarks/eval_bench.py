"""Evaluation speed (BoolQ, MMLU, GSM8K): our evaluation tasks vs lm-evaluation-harness's ``hf`` backend, side by
side in one run.

    python benchmarks/eval_bench.py [--task boolq] [--model smollm-135m tinyllama-1.1b] [--rows 100] [--batch 8] [--rounds 3]
    python benchmarks/eval_bench.py --task mmlu [--rows 100] [--num-fewshot 5]
    python benchmarks/eval_bench.py --task gsm8k [--rows 30] [--max-new-tokens 32]
    python benchmarks/eval_bench.py --hf-dir ./model_from_hf/SOME-MODEL     # its own tokenizer

A shape (``--model``: ``aquila_npu.benchmarking.side_by_side.BENCH_SHAPES`` or the model registry) becomes a random ``LlamaForCausalLM`` with the
vocabulary of ``--tokenizer`` (default: the real Aquila2 tokenizer from ../shared/data) saved as a HF folder with
that tokenizer (or ``--hf-dir`` names one); our converter writes its tp1 Megatron checkpoint. The rows:

* ``boolq``: the first ``--rows`` rows of the real BoolQ dev split, lm-eval's ``boolq`` (log-likelihood of " no" /
  " yes");
* ``mmlu``: ``--rows`` questions (default 100) made here from arithmetic templates (no MMLU data exists here; the
  rows are in MMLU's real layout, two real subjects), lm-eval's stock ``mmlu_<subject>`` tasks (log-likelihood of
  " A".." D"), ``--num-fewshot`` (default 5) examples from each subject's dev split;
* ``gsm8k``: ``--rows`` word problems (default 30) made here from templates in GSM8K's layout (and 8 train rows for
  the few-shot draw), lm-eval's stock ``gsm8k`` (5-shot, greedy ``generate_until``), at most ``--max-new-tokens``
  (default 32) tokens on both sides.

They are scored by:

* lm-eval 0.4.13: ``simple_evaluate`` with an ``HFLM`` (fp32, ``--batch``) on the HF folder, the task given as a
  local YAML on the same rows (``include:`` of the stock task: ``aquila_npu.testing.lm_eval_tasks``);
* ours: ``aquila_npu.evaluation`` (the task with the ``lm-eval`` scoring on a ``ModelRunner``: ``--batch`` sequences
  per forward pass, ``--batch`` rows per generation batch) on the converted checkpoint.

Each side runs in its own process, loads the model, warms up on the first ``--batch`` rows, then is timed from the
rows to the predictions (start-up and loading excluded); the time inside the model calls (log-likelihood or
generation) is shown beside it. The sides alternate for ``--rounds`` rounds (the best counts). Prints both times, the
ratio, whether every per-example prediction (multiple choice) or generated text (GSM8K) is the same and the largest
log-probability difference, with the machine's load average.
"""

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from aquila_npu.benchmarking.side_by_side import (alternate, get_shape, print_result, ratio_range,  # noqa: E402
                                                  shape_out,
                                                  random_hf_model, save_result, worker_env)

SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
TASK = "boolq_bench"
DEFAULT_ROWS = {"boolq": 100, "mmlu": 100, "gsm8k": 30}
MMLU_SUBJECTS = ("elementary_mathematics", "high_school_mathematics")


def mmlu_rows(n: int) -> dict:
    """``n`` test questions (split over ``MMLU_SUBJECTS``) and 5 dev rows per subject in MMLU's layout:
    (question, A, B, C, D, answer letter), from arithmetic templates with a seeded generator."""
    import random

    rng = random.Random(0)

    def row(i):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op, value = [("+", a + b), ("-", a - b), ("*", a * b)][i % 3]
        choices = [value] + rng.sample([value + d for d in (-11, -10, -2, -1, 1, 2, 10, 11)], 3)
        rng.shuffle(choices)
        return (f"What is {a} {op} {b}?", *map(str, choices), "ABCD"[choices.index(value)])

    per = [n // len(MMLU_SUBJECTS) + (k < n % len(MMLU_SUBJECTS)) for k in range(len(MMLU_SUBJECTS))]
    return {s: {"dev": [row(i) for i in range(5)], "test": [row(i) for i in range(m)]}
            for s, m in zip(MMLU_SUBJECTS, per)}


def gsm8k_rows(n: int):
    """8 train and ``n`` test word problems in GSM8K's layout (question, worked answer ending "#### N")."""
    import random

    rng = random.Random(0)
    names, things = ["Tom", "Mia", "Sam", "Ana", "Leo", "Ivy"], ["apples", "books", "coins", "pens", "cards"]

    def row(_):
        who, what = rng.choice(names), rng.choice(things)
        a, b, c = rng.randint(2, 50), rng.randint(2, 50), rng.randint(2, 9)
        total = (a + b) * c
        return (f"{who} has {a} {what} and gets {b} more. Then {who} buys {c} times as many in all. How many "
                f"{what} does {who} have?",
                f"{who} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {what}.\n{c} times that is {a + b} * {c} = "
                f"<<{a + b}*{c}={total}>>{total}.\n#### {total}")

    return [row(i) for i in range(8)], [row(i) for i in range(n)]


def worker_lmeval(a):
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    class TimedHFLM(HFLM):
        seconds = 0.0

        def _timed(self, call, requests):
            t0 = time.perf_counter()
            try:
                return call(requests, disable_tqdm=True)
            finally:
                TimedHFLM.seconds += time.perf_counter() - t0

        def loglikelihood(self, requests, disable_tqdm=False):
            return self._timed(super().loglikelihood, requests)

        def generate_until(self, requests, disable_tqdm=False):
            return self._timed(super().generate_until, requests)

    lm = TimedHFLM(pretrained=a.hf_dir, device="cpu", dtype=torch.float32, batch_size=a.batch)
    tasks = TaskManager(include_path=a.task_dir)
    names = a.lm_tasks.split(",")

    def run(limit):
        return simple_evaluate(model=lm, tasks=names[:1], task_manager=tasks, limit=limit, log_samples=True,
                               bootstrap_iters=0, verbosity="ERROR")

    run(a.batch)  # warm-up
    TimedHFLM.seconds = 0.0
    t0 = time.perf_counter()
    out = run(None)
    seconds = time.perf_counter() - t0
    rows = []
    for name in names[1:] or names:  # a group's subtasks in order, each by document
        docs = {s["doc_id"]: s for s in out["samples"][name]}  # gsm8k logs a document once per filter
        for _, s in sorted(docs.items()):
            rows.append(s["resps"][0][0] if a.task == "gsm8k" else [float(r[0]) for r in s["filtered_resps"]])
    print_result({"seconds": seconds, "model_seconds": TimedHFLM.seconds, "outputs": rows})


def worker_ours(a):
    import torch

    from aquila_npu.checkpoint.load_model import load_model_for_inference
    from aquila_npu.checkpoint.megatron_io import CheckpointInfo
    from aquila_npu.data.tokenizer import load_tokenizer
    from aquila_npu.device.setup import setup
    from aquila_npu.evaluation.runner import ModelRunner
    from aquila_npu.evaluation.scoring import Scorer
    from aquila_npu.evaluation.tasks import EvalOptions, get_task
    from aquila_npu.inference.generation import TextGenerator

    class TimedRunner(ModelRunner):
        seconds = 0.0

        def _timed(self, call, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                TimedRunner.seconds += time.perf_counter() - t0

        def loglikelihood(self, requests):
            return self._timed(super().loglikelihood, requests)

        def next_token_logprobs(self, contexts, token_ids):
            return self._timed(super().next_token_logprobs, contexts, token_ids)

        def generate(self, prompts, max_new_tokens, **kwargs):
            return self._timed(super().generate, prompts, max_new_tokens, **kwargs)

    dev = setup("cpu")
    loaded = load_model_for_inference(CheckpointInfo.read(a.load), dev)
    tok = load_tokenizer(a.hf_dir)
    pad = next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)
    max_length = loaded.spec.max_position_embeddings
    scorer = Scorer(loaded.model, tok, vocab_size=loaded.vocab_size, max_length=max_length,
                    batch_size=a.batch, device=dev.torch_device, pad_id=pad)
    generator = TextGenerator.from_loaded(loaded, dev.torch_device, max_sequence_length=max_length)
    runner = TimedRunner(scorer, generator, batch_size=a.batch, progress=False)
    task = get_task(a.task, EvalOptions(scoring="lm-eval", num_fewshot=a.num_fewshot if a.task == "mmlu" else None,
                                        max_new_tokens=a.max_new_tokens if a.task == "gsm8k" else None))

    def run(limit):
        return task.score(task.load(a.data, limit), runner, task.scoring)

    run(a.batch)  # warm-up
    TimedRunner.seconds = 0.0
    t0 = time.perf_counter()
    records = run(None)
    seconds = time.perf_counter() - t0
    if a.task == "boolq":
        rows = [[p["logprob_no"], p["logprob_yes"]] for p in records]
    elif a.task == "mmlu":
        rows = [r["loglikelihoods"] for r in records]
    else:
        rows = [r["generation"] for r in records]
    print_result({"seconds": seconds, "model_seconds": TimedRunner.seconds, "outputs": rows})
    torch.distributed.destroy_process_group()


def prepare_rows(a, work, task_dir):
    """Our data path and the lm-eval task names ([task] or [group, *subtasks]) over the same rows, and what the rows
    are (for the summary)."""
    from aquila_npu.testing import lm_eval_tasks as lt

    rows = a.rows or DEFAULT_ROWS[a.task]
    if a.task == "boolq":
        data = os.path.join(work, "boolq.jsonl")
        with open(a.data) as src, open(data, "w") as dst:
            for _, line in zip(range(rows), src):
                dst.write(line)
        lt.write_boolq_task(task_dir, TASK, [data])
        return data, [TASK], f"BoolQ dev, first {rows} rows, log-likelihood scoring (lm-eval's boolq)"
    if a.task == "mmlu":
        mmlu = mmlu_rows(rows)
        names = lt.write_lm_eval_mmlu(task_dir, os.path.join(work, "lm_eval_data"), mmlu, a.num_fewshot)
        return (lt.write_mmlu(work, mmlu), names,
                f"MMLU layout, {rows} template-made arithmetic questions ({', '.join(MMLU_SUBJECTS)}), "
                f"{a.num_fewshot}-shot from dev, log-likelihood of A/B/C/D (lm-eval's stock mmlu_<subject> tasks)")
    train, test = gsm8k_rows(rows)
    folder = lt.write_gsm8k(work, train, test)
    return (folder, [lt.write_lm_eval_gsm8k(task_dir, folder, a.max_new_tokens)],
            f"GSM8K layout, {rows} template-made word problems (8 train rows for the 5-shot draw), lm-eval's stock "
            f"gsm8k (5-shot, greedy generate_until, at most {a.max_new_tokens} new tokens)")


def main_run(a):
    import torch

    from aquila_npu.benchmarking.environment import cpu_model
    from aquila_npu.checkpoint.convert import to_megatron
    from aquila_npu.checkpoint.hf_io import HFReader
    from aquila_npu.data.tokenizer import load_tokenizer, vocab_size

    work = a.work_dir or tempfile.mkdtemp(prefix="eval_bench-")
    os.makedirs(work, exist_ok=True)
    hf_dir = a.hf_dir or random_hf_model(get_shape(a.model).replace(vocab_size=vocab_size(load_tokenizer(a.tokenizer))),
                                         os.path.join(work, "hf"), a.tokenizer)
    spec = HFReader(hf_dir).spec
    mg = os.path.join(work, "mg-tp1-pp1")
    if not os.path.isdir(mg):
        to_megatron(HFReader(hf_dir), mg, 1, 1)
    task_dir = os.path.join(work, "lmeval_tasks")
    os.makedirs(task_dir, exist_ok=True)
    data, names, what = prepare_rows(a, work, task_dir)

    me = os.path.abspath(__file__)
    common = ["--task", a.task, "--hf-dir", hf_dir, "--batch", str(a.batch), "--num-fewshot", str(a.num_fewshot),
              "--max-new-tokens", str(a.max_new_tokens)]
    env = worker_env(ROOT, a.threads, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                     HF_DATASETS_CACHE=os.path.join(work, "hf_datasets_cache"))
    sides = {"lm-eval hf": ([sys.executable, me, "--worker", "lmeval", "--task-dir", task_dir, "--lm-tasks",
                             ",".join(names), *common], env),
             "ours": ([sys.executable, me, "--worker", "ours", "--load", mg, "--data", data, *common], env)}
    runs, loads = alternate(sides, a.rounds)

    best = {name: min(rs, key=lambda r: r["seconds"]) for name, rs in runs.items()}
    ref, ours = best["lm-eval hf"], best["ours"]
    generation = a.task == "gsm8k"
    if generation:
        same_rows = sum(x == y for x, y in zip(ours["outputs"], ref["outputs"]))
        diff = None
        check = (f"identical generations: {same_rows == len(ref['outputs'])} ({same_rows} of {len(ref['outputs'])} "
                 f"texts the same)")
    else:
        preds = {name: [max(range(len(r)), key=lambda i: (r[i], -i)) for r in b["outputs"]]
                 for name, b in best.items()}
        same_rows = sum(x == y for x, y in zip(preds["ours"], preds["lm-eval hf"]))
        diff = max(abs(x - y) for r1, r2 in zip(ours["outputs"], ref["outputs"]) for x, y in zip(r1, r2))
        check = (f"identical per-example predictions: {same_rows == len(ref['outputs'])} ({same_rows} of "
                 f"{len(ref['outputs'])}); largest log-probability difference {diff:.2e}")
    same = same_rows == len(ref["outputs"]) == len(ours["outputs"])
    call = "generation" if generation else "log-likelihood"
    header = (f"eval_bench: {what}, batch {a.batch}; "
              f"{a.hf_dir or a.model} ({spec.num_layers} layers, hidden {spec.hidden_size}, "
              f"{spec.num_attention_heads}/{spec.num_key_value_heads} heads, FFN {spec.intermediate_size}, vocab "
              f"{spec.vocab_size}), fp32, tp1; {cpu_model()}, {os.cpu_count()} cores, torch threads "
              f"{a.threads or torch.get_num_threads()}; {a.rounds} round(s), sides alternating, best round shown; "
              f"load average (1 min) {min(loads):.1f}..{max(loads):.1f} during the run; "
              f"{time.strftime('%Y-%m-%d %H:%M')}")
    print(header)
    per_round = [h["seconds"] / o["seconds"] for h, o in zip(runs["lm-eval hf"], runs["ours"])]
    for name, r in best.items():
        ratio = "" if name == "lm-eval hf" else (f"  {ratio_range(per_round)} faster than lm-eval over the rounds; "
                                                 f"best rounds {ref['seconds'] / r['seconds']:.2f}x "
                                                 f"({call} calls {ref['model_seconds'] / r['model_seconds']:.2f}x)")
        print(f"  {name:11s} {r['seconds']:7.2f} s ({call} calls {r['model_seconds']:7.2f} s; all "
              f"rounds {', '.join('%.2f' % x['seconds'] for x in runs[name])} s){ratio}")
    print(f"  {check}")
    save_result(a.out, {"benchmark": "eval_bench", "task": a.task, "summary": header, "model": a.hf_dir or a.model,
                        "rows": len(ref["outputs"]), "batch": a.batch, "rounds": a.rounds, "load_average": loads,
                        "num_fewshot": a.num_fewshot if a.task == "mmlu" else (5 if generation else 0),
                        "max_new_tokens": a.max_new_tokens if generation else None,
                        "seconds": {name: [x["seconds"] for x in rs] for name, rs in runs.items()},
                        f"{call}_seconds": {name: r["model_seconds"] for name, r in best.items()},
                        "speedup_vs_lm_eval": ref["seconds"] / ours["seconds"],
                        "speedup_vs_lm_eval_per_round": per_round,
                        "identical_generations" if generation else "identical_predictions": same,
                        **({} if generation else {"max_logprob_difference": diff}),
                        **({"generations": {"lm-eval hf": ref["outputs"], "ours": ours["outputs"]}}
                           if generation else {})})


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--model", default=None, nargs="+",
                   help="shapes (benchmarking.side_by_side.BENCH_SHAPES or the registry), one comparison each; the "
                        "vocabulary becomes the tokenizer's (default: smollm-135m, whose 100,008-token output layer "
                        "is a third of the model, and tinyllama-1.1b, a 1.1B width where it is ~17%%)")
    p.add_argument("--hf-dir", default=None, help="a Hugging Face model folder (with its tokenizer) instead")
    p.add_argument("--tokenizer", default=os.path.join(SHARED, "aquila2-tokenizer"),
                   help="tokenizer folder for --model (default: ../shared/data/aquila2-tokenizer)")
    p.add_argument("--task", choices=sorted(DEFAULT_ROWS), default="boolq", help="what is scored (default: boolq)")
    p.add_argument("--data", default=os.path.join(SHARED, "boolq", "dev.jsonl"), help="BoolQ jsonl (--task boolq)")
    p.add_argument("--rows", type=int, default=None, help="rows scored (default: boolq 100, the first of --data; "
                                                          "mmlu 100; gsm8k 30)")
    p.add_argument("--num-fewshot", type=int, default=5, help="MMLU few-shot examples (default 5)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="GSM8K: generated tokens at most, both sides")
    p.add_argument("--batch", type=int, default=8, help="sequences per forward pass, both sides")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of both sides (default 3; the ratio is "
                                                        "printed as its range over the rounds)")
    p.add_argument("--work-dir", default=None, help="where models and checkpoints go (default: a new temporary "
                                                    "folder)")
    p.add_argument("--threads", type=int, default=None, help="torch threads, both sides (default: torch's, one per "
                                                             "core)")
    p.add_argument("--out", default=None, help="also write the result as JSON here "
                                               "(benchmarks/results/eval-vs-lm-eval-*.json)")
    p.add_argument("--worker", choices=["lmeval", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--load", help=argparse.SUPPRESS)
    p.add_argument("--task-dir", help=argparse.SUPPRESS)
    p.add_argument("--lm-tasks", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker == "lmeval":
        worker_lmeval(a)
    elif a.worker == "ours":
        worker_ours(a)
    else:
        for path in ((a.data,) if a.task == "boolq" else ()) + (() if a.hf_dir else (a.tokenizer,)):
            if not os.path.exists(path):
                sys.exit(f"eval_bench: {path} does not exist (give --data / --tokenizer)")
        shapes = a.model or (["smollm-135m", "tinyllama-1.1b"] if not a.hf_dir else ["smollm-135m"])
        for shape in shapes:  # one comparison per shape (issue 28: a real model's width with this vocabulary too)
            main_run(argparse.Namespace(**dict(vars(a), model=shape, out=shape_out(a.out, shape, len(shapes) > 1),
                                               work_dir=a.work_dir and os.path.join(a.work_dir, shape))))


if __name__ == "__main__":
    main()
