"""LoRA vs full fine-tuning of the same model, side by side in one run: trainable parameters, optimizer-state bytes
(measured from the optimizer's tensors after training) and step time.

    python benchmarks/lora_bench.py [--model aquila2-small] [--seq-length 256] [--iters 8] [--bf16]
                                    [--lora-r 16 --lora-alpha 32] [--nproc 1 --tp 1 --pp 1] [--out FILE]

Builds a random Hugging Face model of a registry architecture, converts it to a Megatron checkpoint, and trains it
twice from that checkpoint on the same random tokens (``--mock-data``): full training (``aquila_npu.pretrain``'s
loop) and LoRA on linear_qkv linear_proj linear_fc1 linear_fc2 (``aquila_npu.testing.lora_pretrain``, the same loop
with the LoRA calls). Prints both and the LoRA / full ratios; step time is the fastest and the median iteration after
the first (on a shared machine the fastest is the steadier figure). Figures from a CPU are functional, not NPU or GPU
throughput.
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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.nproc), "--master-port",
           str(free_port()), "-m", "aquila_npu.testing.lora_pretrain", "--load", base, "--finetune", "--mock-data",
           "--micro-batch-size", str(a.micro_batch_size), "--global-batch-size", str(a.global_batch_size),
           "--seq-length", str(a.seq_length), "--train-iters", str(a.iters), "--lr", "1e-4",
           "--tensor-model-parallel-size", str(a.tp), "--pipeline-model-parallel-size", str(a.pp),
           "--save", os.path.join(workdir, f"ck-{name}"), "--metrics-file", metrics, "--report", report,
           *(["--bf16"] if a.bf16 else []), *extra]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(a.threads), PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{name} run failed:\n{proc.stderr[-4000:]}")
    with open(metrics) as f:
        steps = [json.loads(line)["step_time_s"] for line in f]
    with open(report) as f:
        rep = json.load(f)
    return {"trainable_parameters": rep["counts"]["trainable"], "parameters": rep["counts"]["total"],
            "optimizer_state_bytes_rank0": rep["saves"][-1]["optimizer_bytes"]["total"],
            "step_time_min_s": min(steps[1:]), "step_time_median_s": statistics.median(steps[1:]),
            "step_times_s": steps, "dtypes": rep["dtypes"],
            "start_line": rep.get("start")}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="aquila2-small", help="registry architecture (default aquila2-small: hidden "
                                                             "256, 4 layers, the real 100008-token vocabulary)")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--global-batch-size", type=int, default=4)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--bf16", action="store_true", help="bf16 base (adapters stay fp32)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    p.add_argument("--out", default=None, help="write the result as JSON here (benchmarks/results/lora-vs-full-*.json; "
                                               "cpu-*.json there are aquila_npu.benchmark results)")
    a = p.parse_args()

    from aquila_npu.checkpoint.convert import to_megatron
    from aquila_npu.checkpoint.hf_io import HFReader
    from aquila_npu.models.registry import get_model_spec
    from aquila_npu.testing.tiny_hf import tiny_llama
    from aquila_npu.weights.mapping import LORA_TARGETS

    spec = get_model_spec(a.model)
    if a.layers:
        spec = spec.replace(num_layers=a.layers)
    with tempfile.TemporaryDirectory(prefix="aquila_lora_bench_") as d:
        tiny_llama(spec).save_pretrained(os.path.join(d, "hf"))
        to_megatron(HFReader(os.path.join(d, "hf")), os.path.join(d, "mg"), a.tp, a.pp)
        base = os.path.join(d, "mg")
        full = _run(a, d, "full", base, [])
        lora = _run(a, d, "lora", base, ["--lora-target-modules", *LORA_TARGETS, "--lora-r", str(a.lora_r),
                                         "--lora-alpha", str(a.lora_alpha)])
    keys = ("trainable_parameters", "optimizer_state_bytes_rank0", "step_time_min_s", "step_time_median_s")
    ratios = {k: lora[k] / full[k] for k in keys}
    result = {"model": spec.name, "layers": spec.num_layers, "seq_length": a.seq_length,
              "global_batch_size": a.global_batch_size, "dtype": "bf16" if a.bf16 else "fp32",
              "tp": a.tp, "pp": a.pp, "nproc": a.nproc, "lora_r": a.lora_r, "lora_alpha": a.lora_alpha,
              "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "date": time.strftime("%Y-%m-%d"), "full": full, "lora": lora, "lora_over_full": ratios}
    print(f"{spec.name} ({spec.num_layers} layers), seq {a.seq_length}, global batch {a.global_batch_size}, "
          f"{result['dtype']}, tp{a.tp}-pp{a.pp}, {a.iters} iterations; LoRA r {a.lora_r} alpha {a.lora_alpha:g} on "
          f"{' '.join(LORA_TARGETS)}")
    print(f"{'':28}{'full':>16}{'LoRA':>16}{'LoRA / full':>14}")
    for k, fmt in zip(keys, ("{:,}", "{:,}", "{:.3f}", "{:.3f}")):
        print(f"{k:28}{fmt.format(full[k]):>16}{fmt.format(lora[k]):>16}{ratios[k]:>14.4f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
