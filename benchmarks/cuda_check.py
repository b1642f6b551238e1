"""The CUDA path, checked once on a GPU, side by side with the CPU in one run (docs/benchmark.md, "GPU run").

    python benchmarks/cuda_check.py --out-dir DIR [--skip-benchmark]

1. logits: ``aquila_npu.selfcheck --device cuda`` (our model vs Hugging Face LlamaForCausalLM) in bf16 and fp32;
2. training: one converted tiny checkpoint trained 8 iterations on ``--device cpu`` and ``--device cuda``, fp32 and
   bf16, the per-iteration losses side by side (relative difference);
3. throughput: ``aquila_npu.benchmark`` on Aquila2-7B width, 4 layers, seq 4096, bf16, unfused vs the fused switches
   this GPU can build (without Transformer Engine: megatron-core's fused SwiGLU only);
4. the machine's own limits, measured in the same run: a bf16 8192^3 GEMM's TFLOP/s and a device copy's GB/s.

Writes ``cuda_check.json`` (and the benchmark's JSON) under ``--out-dir``. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a file from a checkout
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
           PYTHONWARNINGS="ignore")


def run(cmd, **kw):
    print("$", " ".join(map(str, cmd)), flush=True)
    t = time.time()
    proc = subprocess.run([str(c) for c in cmd], env=ENV, cwd=ROOT, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-8000:], sep="\n")
        raise SystemExit(f"failed ({proc.returncode}): {cmd}")
    print(f"  ok in {time.time() - t:.1f} s", flush=True)
    return proc


def logits(work):
    out = {}
    for dtype in ("bf16", "fp32"):
        path = os.path.join(work, f"selfcheck-{dtype}.json")
        run([sys.executable, "-m", "aquila_npu.selfcheck", "--device", "cuda", "--dtype", dtype, "--out", path])
        with open(path) as f:
            out[dtype] = json.load(f)
        print(f"  logits vs HF ({dtype}): max |diff| {out[dtype]['max_abs_diff']:.3g}, "
              f"argmax agree {out[dtype]['argmax_agree']:.3f}")
    return out


def training(work):
    from aquila_npu.checkpoint.convert import to_megatron
    from aquila_npu.checkpoint.hf_io import HFReader
    from aquila_npu.testing.tiny_hf import tiny_llama

    hf, mg = os.path.join(work, "hf"), os.path.join(work, "mg")
    tiny_llama().save_pretrained(hf)
    to_megatron(HFReader(hf), mg, 1, 1)
    common = ["--load", mg, "--mock-data", "--micro-batch-size", 2, "--global-batch-size", 4, "--seq-length", 64, "--lr", 1e-3,
              "--lr-decay-style", "constant", "--train-iters", 8, "--log-interval", 1, "--eval-interval", 1000]
    out = {}
    for dtype in ("fp32", "bf16"):
        losses = {}
        for device in ("cpu", "cuda"):
            metrics = os.path.join(work, f"train-{device}-{dtype}.jsonl")
            run([sys.executable, "-m", "aquila_npu.pretrain", *common, "--device", device, "--metrics-file", metrics,
                 *(["--bf16"] if dtype == "bf16" else [])])
            with open(metrics) as f:
                losses[device] = [json.loads(line)["lm_loss"] for line in f if "lm_loss" in line]
        rel = [abs(a - b) / abs(a) for a, b in zip(losses["cpu"], losses["cuda"])]
        out[dtype] = {"cpu": losses["cpu"], "cuda": losses["cuda"], "max_rel_diff": max(rel)}
        print(f"  training losses cpu vs cuda ({dtype}): max relative difference {max(rel):.2e}")
        for i, (a, b) in enumerate(zip(losses["cpu"], losses["cuda"]), 1):
            print(f"    iteration {i}: cpu {a:.6f}  cuda {b:.6f}")
    return out


def limits():
    dev = torch.device("cuda")
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    gemm = 2 * 8192 ** 3 * 10 / (start.elapsed_time(end) / 1e3) / 1e12
    x = torch.empty(2 ** 30, dtype=torch.uint8, device=dev)  # 1 GiB
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    copy = 2 * x.numel() * 10 / (start.elapsed_time(end) / 1e3) / 1e9  # bytes read + written
    print(f"  measured limits: bf16 GEMM 8192^3 {gemm:.0f} TFLOP/s, device copy {copy:.0f} GB/s (read + write)")
    return {"bf16_gemm_tflops": gemm, "copy_gb_per_s": copy}


def throughput(out_dir):
    path = os.path.join(out_dir, "gpu-aquila2-7b-4l-seq4096.json")
    proc = run([sys.executable, "-m", "aquila_npu.benchmark", "--model", "aquila2-7b", "--num-layers", 4,
                "--seq-length", 4096, "--dtype", "bf16", "--micro-batch-size", 1, "--global-batch-size", 8,
                "--warmup", 3, "--iters", 10, "--fused", "both", "--fused-switches", "swiglu", "--device", "cuda",
                "--output", path], timeout=420)
    print(proc.stdout[-3000:])
    with open(path) as f:
        return json.load(f)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--skip-benchmark", action="store_true")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here")
    os.makedirs(a.out_dir, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
              "date": time.strftime("%Y-%m-%d")}
    import megatron.core
    import transformers
    result["megatron_core"] = megatron.core.__version__
    result["transformers"] = transformers.__version__
    work = tempfile.mkdtemp(prefix="cuda-check-")
    result["limits"] = limits()
    result["logits_vs_hf"] = logits(work)
    result["training_cpu_vs_cuda"] = training(work)
    if not a.skip_benchmark:
        bench = throughput(a.out_dir)
        result["benchmark"] = {k: bench.get(k) for k in ("label", "runs", "fused_vs_unfused")}
    with open(os.path.join(a.out_dir, "cuda_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "benchmark"}, indent=1))


if __name__ == "__main__":
    main()
