"""QLoRA vs LoRA vs full fine-tuning of the same bf16 model, side by side in one run: the frozen base linears' bytes
per parameter, the process's peak memory, trainable parameters, optimizer state and step time.

    python benchmarks/qlora_bench.py [--hidden-size 1024 --ffn-hidden-size 2816 --layers 8 --vocab-size 8000]
                                     [--seq-length 256] [--iters 6] [--lora-r 16 --lora-alpha 32] [--out FILE]
                                     [--runs full,lora,qlora]

Builds a random Hugging Face model (Aquila2's proportions: the decoder linears hold most of the parameters, as in
Aquila2-7B's 89%), converts it twice (bf16, and bf16 quantised to NF4 with ``--qlora-nf4``) and trains it three times
on the same random tokens (``--mock-data``, bf16 compute, one process, one thread each by default), each run a fresh
process (``aquila_npu.testing.lora_pretrain``: the real run plus a report): full fine-tuning, LoRA on the bf16 base,
QLoRA on the NF4 base (adapters r 16 alpha 32 on the four linears). Peak memory is each process's peak resident set
(``getrusage``), which includes what importing torch and megatron-core costs (the same in every run); the base
linears' bytes are read from the model (weights, or NF4 codes + absmax). Step time: fastest and median iteration after
the first. Figures from a CPU are functional, not NPU or GPU throughput.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _run(a, workdir, name, base, extra):
    from aquila_npu.ports import free_port

    metrics, report = os.path.join(workdir, f"{name}.jsonl"), os.path.join(workdir, f"{name}.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port",
           str(free_port()), "-m", "aquila_npu.testing.lora_pretrain", "--load", base, "--finetune", "--mock-data",
           "--micro-batch-size", str(a.micro_batch_size), "--global-batch-size", str(a.global_batch_size),
           "--seq-length", str(a.seq_length), "--train-iters", str(a.iters), "--lr", "1e-4", "--bf16",
           "--save", os.path.join(workdir, f"ck-{name}"), "--save-interval", str(a.iters + 1),
           "--metrics-file", metrics, "--report", report, *extra]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(a.threads), PYTHONWARNINGS="ignore")
    t = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{name} run failed:\n{proc.stderr[-4000:]}")
    with open(metrics) as f:
        recs = [json.loads(line) for line in f]
    with open(report) as f:
        rep = json.load(f)
    steps = [r["step_time_s"] for r in recs]
    base = rep["base_linears"]
    return {"trainable_parameters": rep["counts"]["trainable"], "parameters": rep["counts"]["total"],
            "base_linear_parameters": base["parameters"], "base_linear_bytes": base["bytes"],
            "base_bytes_per_parameter": base["bytes"] / base["parameters"],
            "peak_rss_bytes": rep["peak_rss_bytes"],
            "optimizer_state_bytes": rep["saves"][-1]["optimizer_bytes"]["total"],
            "step_time_min_s": min(steps[1:]), "step_time_median_s": statistics.median(steps[1:]),
            "step_times_s": steps, "losses": [r["lm_loss"] for r in recs], "dtypes": rep["dtypes"],
            "start_line": rep.get("start"), "wall_s": time.time() - t}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--ffn-hidden-size", type=int, default=2816, help="a multiple of 64 (bitsandbytes' blocks)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=2)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32)
    p.add_argument("--threads", type=int, default=1, help="OMP threads of each run")
    p.add_argument("--runs", default="full,lora,qlora",
                   help="which runs, comma-separated (full fine-tuning of a real model width needs ~18 bytes per "
                        "parameter: leave it out where memory is short)")
    p.add_argument("--out", default=None, help="write the result as JSON here (benchmarks/results/qlora-*.json)")
    a = p.parse_args()

    import torch

    from aquila_npu.checkpoint.convert import to_megatron
    from aquila_npu.checkpoint.hf_io import HFReader
    from aquila_npu.models.registry import get_model_spec
    from aquila_npu.testing.tiny_hf import tiny_llama
    from aquila_npu.weights.mapping import LORA_TARGETS

    spec = get_model_spec("aquila2-small").replace(
        name="aquila2-qlora-bench", hidden_size=a.hidden_size, intermediate_size=a.ffn_hidden_size,
        num_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads, vocab_size=a.vocab_size,
        max_position_embeddings=max(a.seq_length, 512))
    lora = ["--lora-target-modules", *LORA_TARGETS, "--lora-r", str(a.lora_r), "--lora-alpha", str(a.lora_alpha)]
    names = [n.strip() for n in a.runs.split(",")]
    if not {"lora", "qlora"} <= set(names) or not set(names) <= {"full", "lora", "qlora"}:
        p.error("--runs: lora and qlora, and optionally full")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="aquila_qlora_bench_") as d:
        hf = os.path.join(d, "hf")
        tiny_llama(spec, dtype=torch.bfloat16).save_pretrained(hf)
        to_megatron(HFReader(hf), os.path.join(d, "bf16"), 1, 1, params_dtype=torch.bfloat16)
        to_megatron(HFReader(hf), os.path.join(d, "nf4"), 1, 1, params_dtype=torch.bfloat16, qlora_nf4=True)
        plans = {"full": ("bf16", []), "lora": ("bf16", lora), "qlora": ("nf4", ["--qlora", *lora])}
        runs = {n: _run(a, d, n, os.path.join(d, plans[n][0]), plans[n][1]) for n in plans if n in names}
    keys = ("base_bytes_per_parameter", "peak_rss_bytes", "trainable_parameters", "optimizer_state_bytes",
            "step_time_min_s", "step_time_median_s")
    result = {"model": spec.name, "hidden_size": spec.hidden_size, "ffn_hidden_size": spec.intermediate_size,
              "layers": spec.num_layers, "heads": spec.num_attention_heads, "vocab_size": spec.vocab_size,
              "parameters": spec.num_parameters(), "seq_length": a.seq_length,
              "global_batch_size": a.global_batch_size, "micro_batch_size": a.micro_batch_size, "iters": a.iters,
              "dtype": "bf16", "lora_r": a.lora_r, "lora_alpha": a.lora_alpha, "threads": a.threads,
              "host": f"{_cpu_model()}, {os.cpu_count()} cores",
              "load_before": load_before, "load_after": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d"),
              **runs,
              "qlora_over_lora": {k: runs["qlora"][k] / runs["lora"][k] for k in keys},
              "qlora_peak_saving_bytes": runs["lora"]["peak_rss_bytes"] - runs["qlora"]["peak_rss_bytes"],
              "lora_base_saving_bytes": runs["lora"]["base_linear_bytes"] - runs["qlora"]["base_linear_bytes"]}
    print(f"{spec.name}: hidden {spec.hidden_size}, ffn {spec.intermediate_size}, {spec.num_layers} layers, vocab "
          f"{spec.vocab_size} ({spec.num_parameters():,} parameters), seq {a.seq_length}, global batch "
          f"{a.global_batch_size}, bf16, {a.iters} iterations")
    shown = [n for n in ("full", "lora", "qlora") if n in runs]
    titles = {"full": "full", "lora": "LoRA", "qlora": "QLoRA"}
    print(f"{'':28}" + "".join(f"{titles[n]:>16}" for n in shown) + f"{'QLoRA / LoRA':>14}")
    for k in keys:
        vals = [runs[n][k] for n in shown]
        fmt = "{:,.0f}" if isinstance(vals[0], int) or vals[0] > 1000 else "{:.4f}"
        print(f"{k:28}" + "".join(f"{fmt.format(v):>16}" for v in vals) + f"{result['qlora_over_lora'][k]:>14.4f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
