"""tools/preprocess_data.py throughput with --workers 1 and --workers 2 (or more) in one run.

    python benchmarks/preprocess_bench.py [--docs 50000] [--format parquet|jsonl] [--workers 1 2] [--repeat 1]
                                          [--tokenizer DIR] [--workdir DIR]

Generates a corpus of ``--docs`` documents (seeded random English-like text with some Chinese, 20-200 words each,
about 600 bytes on average) in a temporary directory, then runs the real command line once per worker count on it and
prints docs/s for each: the tool's own figure (from its last line: reading, tokenizing and writing, after start-up)
and the end-to-end one (wall clock of the whole command, Python and megatron-core imports included), with the ratios
to the first worker count, and the CPU seconds each run used (all its processes; CPU s / wall s is how many cores
it actually got: at most 1 for --workers 1, near N for --workers N on an idle machine). With ``--repeat N`` the
worker counts are run N times, interleaved, and the best run of each is reported (on a shared machine other jobs slow
some runs). The outputs of all runs are checked to be byte-identical. Uses the real Aquila2 tokenizer when
../shared/data is present (or --tokenizer DIR), else (or with --tokenizer generated) a byte-level BPE trained here on the corpus.
"""

import argparse
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "preprocess_data.py")
REAL_TOKENIZER = os.path.join(os.path.dirname(ROOT), "shared", "data", "aquila2-tokenizer")
WORDS = ("the of and to in is was for on that with as by at from his her are this be it an which or had not were "
         "but have their they one all been has more when who will would there what about into than other some time "
         "model data training language network layer token sequence parallel device memory kernel attention tensor "
         "gradient optimizer checkpoint pipeline benchmark throughput accuracy evaluation instruction response").split()
HANZI = "我们的模型在数据上训练语言网络层序列并行设备内存注意力梯度优化检查点流水线吞吐准确评估指令回答"


def make_corpus(path, n, fmt, seed=0):
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        words = []
        for _ in range(rng.randint(20, 200)):
            words.append("".join(rng.choices(HANZI, k=rng.randint(1, 4))) if rng.random() < 0.08 else rng.choice(WORDS))
        text = " ".join(words).capitalize() + f". Document {i}."
        texts.append(text)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": texts}), path)
    else:
        with open(path, "w", encoding="utf-8") as f:
            for t in texts:
                f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    return texts


def make_tokenizer(path, corpus_sample):
    from aquila_npu.data.bpe import train_tokenizer

    return train_tokenizer(path, corpus_sample, vocab_size=8000)


def run_tool(corpus, tokenizer, prefix, workers):
    cmd = [sys.executable, TOOL, "--input", corpus, "--tokenizer-name-or-path", tokenizer, "--output-prefix", prefix,
           "--workers", str(workers), "--log-interval", "10000", "--tokenizer-type", "PretrainedFromHF",
           "--append-eod"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    m = re.search(r"Done: (\d+) documents .* in ([\d.]+) s: ([\d.]+) docs/s, ([\d.]+) MB/s", proc.stdout)
    return {"docs": int(m.group(1)), "seconds": float(m.group(2)), "docs_s": float(m.group(3)),
            "mb_s": float(m.group(4)), "wall": wall, "cpu": cpu}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=50000)
    p.add_argument("--format", choices=["parquet", "jsonl"], default="parquet")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=1, help="run each worker count this many times (interleaved)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory, or 'generated' (default: the real Aquila2 one if present)")
    p.add_argument("--workdir", default=None, help="where the corpus and outputs go (default: a temporary directory)")
    args = p.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="aquila_preprocess_bench_")
    os.makedirs(work, exist_ok=True)
    try:
        corpus = os.path.join(work, f"corpus.{args.format}")
        texts = make_corpus(corpus, args.docs, args.format)
        nbytes = sum(len(t.encode("utf-8")) for t in texts)
        tokenizer = args.tokenizer or (REAL_TOKENIZER if os.path.isdir(REAL_TOKENIZER) else "generated")
        which = "real Aquila2 (100,008 tokens)" if tokenizer == REAL_TOKENIZER else tokenizer
        if tokenizer == "generated":
            tokenizer = make_tokenizer(os.path.join(work, "tokenizer"), texts[:2000])
            which = "byte-level BPE trained here (8,000 tokens)"
        print(f"corpus: {args.docs} documents, {nbytes / 1e6:.1f} MB of text, {args.format}; tokenizer: {which}")
        print(f"machine: {os.cpu_count()} CPUs, load average before the runs {os.getloadavg()[0]:.2f}")
        results = {}
        for rep in range(args.repeat):
            for w in args.workers:
                r = run_tool(corpus, tokenizer, os.path.join(work, f"out_w{w}"), w)
                print(f"  run {rep + 1}, --workers {w}: {r['docs_s']:.0f} docs/s (tool), {r['wall']:.1f} s wall, "
                      f"{r['cpu']:.1f} CPU s ({r['cpu'] / r['wall']:.2f} cores busy on average), "
                      f"load average {os.getloadavg()[0]:.2f}", flush=True)
                if w not in results or r["docs_s"] > results[w]["docs_s"]:
                    results[w] = r
        outputs = {w: [open(os.path.join(work, f"out_w{w}_text_document{e}"), "rb").read() for e in (".bin", ".idx")]
                   for w in args.workers}
        same = all(outputs[w] == outputs[args.workers[0]] for w in args.workers)
        base = results[args.workers[0]]
        print(("best of %d:" % args.repeat) if args.repeat > 1 else "")
        print(f"{'workers':>7} | {'tool docs/s':>11} | {'MB/s':>6} | {'ratio':>5} | {'end-to-end docs/s':>17} | "
              f"{'ratio':>5} | {'wall s':>6} | {'CPU s':>6}")
        for w, r in results.items():
            e2e = r["docs"] / r["wall"]
            print(f"{w:>7} | {r['docs_s']:>11.0f} | {r['mb_s']:>6.2f} | {r['docs_s'] / base['docs_s']:>5.2f} | "
                  f"{e2e:>17.0f} | {e2e / (base['docs'] / base['wall']):>5.2f} | {r['wall']:>6.1f} | {r['cpu']:>6.1f}")
        print(f"outputs byte-identical across worker counts: {same}")
        print(f"load average after the runs {os.getloadavg()[0]:.2f}")
        if not same:
            raise SystemExit(1)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
