"""BoolQ scoring speed: our ``Scorer`` vs lm-evaluation-harness's ``hf`` backend, side by side in one run.

    python benchmarks/eval_bench.py [--model smollm-135m] [--rows 100] [--batch 8] [--rounds 1]
    python benchmarks/eval_bench.py --hf-dir ./model_from_hf/SOME-MODEL     # its own tokenizer

A shape (``--model``: ``aquila_npu.benchmarking.side_by_side.BENCH_SHAPES`` or the model registry) becomes a random ``LlamaForCausalLM`` with the
vocabulary of ``--tokenizer`` (default: the real Aquila2 tokenizer from ../shared/data) saved as a HF folder with
that tokenizer (or ``--hf-dir`` names one); our converter writes its tp1 Megatron checkpoint. The first ``--rows``
rows of the real BoolQ dev split are scored with the ``loglikelihood`` scoring (lm-eval's ``boolq`` prompt and
choices) by:

* lm-eval 0.4.13: ``simple_evaluate`` with an ``HFLM`` (fp32, ``--batch``) on the HF folder, the task given as a
  local YAML on the same rows;
* ours: ``aquila_npu.evaluation`` (the BoolQ task on a ``Scorer`` with ``--batch`` sequences per forward pass) on the
  converted checkpoint.

Each side runs in its own process, loads the model, warms up on the first ``--batch`` rows, then is timed from the
rows to the predictions (start-up and loading excluded); the time inside the model's log-likelihood call is shown
beside it. The sides alternate for ``--rounds`` rounds (the best counts). Prints both times, the ratio, whether every
per-example prediction is the same and the largest log-probability difference, with the machine's load average.
"""

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from aquila_npu.benchmarking.side_by_side import (alternate, get_shape, print_result,  # noqa: E402
                                                  random_hf_model, save_result, worker_env)

SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
TASK = "boolq_bench"


def worker_lmeval(a):
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    class TimedHFLM(HFLM):
        seconds = 0.0

        def loglikelihood(self, requests, disable_tqdm=False):
            t0 = time.perf_counter()
            try:
                return super().loglikelihood(requests, disable_tqdm=True)
            finally:
                TimedHFLM.seconds += time.perf_counter() - t0

    lm = TimedHFLM(pretrained=a.hf_dir, device="cpu", dtype=torch.float32, batch_size=a.batch)
    tasks = TaskManager(include_path=a.task_dir)

    def run(limit):
        return simple_evaluate(model=lm, tasks=[TASK], task_manager=tasks, limit=limit, log_samples=True,
                               bootstrap_iters=0, verbosity="ERROR")

    run(a.batch)  # warm-up
    TimedHFLM.seconds = 0.0
    t0 = time.perf_counter()
    out = run(None)
    seconds = time.perf_counter() - t0
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    rows = [[float(s["filtered_resps"][0][0]), float(s["filtered_resps"][1][0])] for s in samples]
    print_result({"seconds": seconds, "loglikelihood_seconds": TimedHFLM.seconds, "logprobs": rows})


def worker_ours(a):
    import torch

    from aquila_npu.checkpoint.load_model import load_model_for_inference
    from aquila_npu.checkpoint.megatron_io import CheckpointInfo
    from aquila_npu.data.tokenizer import load_tokenizer
    from aquila_npu.device.setup import setup
    from aquila_npu.evaluation.boolq import BoolQ
    from aquila_npu.evaluation.scoring import Scorer

    class TimedScorer(Scorer):
        seconds = 0.0

        def loglikelihood(self, requests):
            t0 = time.perf_counter()
            try:
                return super().loglikelihood(requests)
            finally:
                TimedScorer.seconds += time.perf_counter() - t0

    dev = setup("cpu")
    loaded = load_model_for_inference(CheckpointInfo.read(a.load), dev)
    tok = load_tokenizer(a.hf_dir)
    pad = next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)
    scorer = TimedScorer(loaded.model, tok, vocab_size=loaded.vocab_size, max_length=loaded.spec.max_position_embeddings,
                         batch_size=a.batch, device=dev.torch_device, pad_id=pad)
    task = BoolQ()

    def run(limit):
        return task.score(task.load(a.data, limit), scorer, "loglikelihood")

    run(a.batch)  # warm-up
    TimedScorer.seconds = 0.0
    t0 = time.perf_counter()
    preds = run(None)
    seconds = time.perf_counter() - t0
    rows = [[p["logprob_no"], p["logprob_yes"]] for p in preds]
    print_result({"seconds": seconds, "loglikelihood_seconds": TimedScorer.seconds, "logprobs": rows})
    torch.distributed.destroy_process_group()


def main_run(a):
    import torch

    from aquila_npu.benchmarking.environment import cpu_model
    from aquila_npu.checkpoint.convert import to_megatron
    from aquila_npu.checkpoint.hf_io import HFReader
    from aquila_npu.data.tokenizer import load_tokenizer, vocab_size
    from aquila_npu.testing.lm_eval_tasks import write_boolq_task

    work = a.work_dir or tempfile.mkdtemp(prefix="eval_bench-")
    os.makedirs(work, exist_ok=True)
    hf_dir = a.hf_dir or random_hf_model(get_shape(a.model).replace(vocab_size=vocab_size(load_tokenizer(a.tokenizer))),
                                         os.path.join(work, "hf"), a.tokenizer)
    spec = HFReader(hf_dir).spec
    mg = os.path.join(work, "mg-tp1-pp1")
    if not os.path.isdir(mg):
        to_megatron(HFReader(hf_dir), mg, 1, 1)
    data = os.path.join(work, "boolq.jsonl")
    with open(a.data) as src, open(data, "w") as dst:
        for _, line in zip(range(a.rows), src):
            dst.write(line)
    task_dir = os.path.join(work, "lmeval_tasks")
    os.makedirs(task_dir, exist_ok=True)
    write_boolq_task(task_dir, TASK, [data])

    me = os.path.abspath(__file__)
    common = ["--hf-dir", hf_dir, "--batch", str(a.batch)]
    env = worker_env(ROOT, a.threads, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                     HF_DATASETS_CACHE=os.path.join(work, "hf_datasets_cache"))
    sides = {"lm-eval hf": ([sys.executable, me, "--worker", "lmeval", "--task-dir", task_dir, *common], env),
             "ours": ([sys.executable, me, "--worker", "ours", "--load", mg, "--data", data, *common], env)}
    runs, loads = alternate(sides, a.rounds)

    best = {name: min(rs, key=lambda r: r["seconds"]) for name, rs in runs.items()}
    ref, ours = best["lm-eval hf"], best["ours"]
    preds = {name: [yes > no for no, yes in r["logprobs"]] for name, r in best.items()}
    same = preds["ours"] == preds["lm-eval hf"]
    diff = max(abs(x - y) for r1, r2 in zip(ours["logprobs"], ref["logprobs"]) for x, y in zip(r1, r2))
    header = (f"eval_bench: BoolQ dev, first {len(ref['logprobs'])} rows, loglikelihood scoring, batch {a.batch}; "
              f"{a.hf_dir or a.model} ({spec.num_layers} layers, hidden {spec.hidden_size}, "
              f"{spec.num_attention_heads}/{spec.num_key_value_heads} heads, FFN {spec.intermediate_size}, vocab "
              f"{spec.vocab_size}), fp32, tp1; {cpu_model()}, {os.cpu_count()} cores, torch threads "
              f"{a.threads or torch.get_num_threads()}; {a.rounds} round(s), sides alternating, best round shown; "
              f"load average (1 min) {min(loads):.1f}..{max(loads):.1f} during the run; "
              f"{time.strftime('%Y-%m-%d %H:%M')}")
    print(header)
    for name, r in best.items():
        ratio = "" if name == "lm-eval hf" else (f"  {ref['seconds'] / r['seconds']:.2f}x faster than lm-eval "
                                                 f"(log-likelihood calls {ref['loglikelihood_seconds'] / r['loglikelihood_seconds']:.2f}x)")
        print(f"  {name:11s} {r['seconds']:7.2f} s (log-likelihood call {r['loglikelihood_seconds']:7.2f} s; all "
              f"rounds {', '.join('%.2f' % x['seconds'] for x in runs[name])} s){ratio}")
    print(f"  identical per-example predictions: {same} ({sum(preds['ours'])} yes of {len(preds['ours'])}); largest "
          f"log-probability difference {diff:.2e}")
    save_result(a.out, {"benchmark": "eval_bench", "summary": header, "model": a.hf_dir or a.model,
                        "rows": len(ref["logprobs"]), "batch": a.batch, "rounds": a.rounds, "load_average": loads,
                        "seconds": {name: [x["seconds"] for x in rs] for name, rs in runs.items()},
                        "loglikelihood_seconds": {name: r["loglikelihood_seconds"] for name, r in best.items()},
                        "speedup_vs_lm_eval": ref["seconds"] / ours["seconds"],
                        "identical_predictions": same, "max_logprob_difference": diff})


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--model", default="smollm-135m", help="shape (benchmarking.side_by_side.BENCH_SHAPES or the "
                                                          "registry); its vocabulary becomes the tokenizer's")
    p.add_argument("--hf-dir", default=None, help="a Hugging Face model folder (with its tokenizer) instead")
    p.add_argument("--tokenizer", default=os.path.join(SHARED, "aquila2-tokenizer"),
                   help="tokenizer folder for --model (default: ../shared/data/aquila2-tokenizer)")
    p.add_argument("--data", default=os.path.join(SHARED, "boolq", "dev.jsonl"), help="BoolQ jsonl")
    p.add_argument("--rows", type=int, default=100, help="first N rows of --data")
    p.add_argument("--batch", type=int, default=8, help="sequences per forward pass, both sides")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds of both sides")
    p.add_argument("--work-dir", default=None, help="where models and checkpoints go (default: a new temporary "
                                                    "folder)")
    p.add_argument("--threads", type=int, default=None, help="torch threads, both sides (default: torch's, one per "
                                                             "core)")
    p.add_argument("--out", default=None, help="also write the result as JSON here "
                                               "(benchmarks/results/eval-vs-lm-eval-*.json)")
    p.add_argument("--worker", choices=["lmeval", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--load", help=argparse.SUPPRESS)
    p.add_argument("--task-dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker == "lmeval":
        worker_lmeval(a)
    elif a.worker == "ours":
        worker_ours(a)
    else:
        for path in (a.data,) + (() if a.hf_dir else (a.tokenizer,)):
            if not os.path.exists(path):
                sys.exit(f"eval_bench: {path} does not exist (give --data / --tokenizer)")
        main_run(a)


if __name__ == "__main__":
    main()
