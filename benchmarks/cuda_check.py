"""The CUDA path, checked once on a GPU, side by side with the CPU in one run (docs/benchmark.md, "GPU run").

    python benchmarks/cuda_check.py --out-dir DIR [--skip-benchmark] [--variants plain,chunked-loss,...]
    python benchmarks/cuda_check.py --out-dir DIR --tiny --device cpu      # the script itself, on a CPU

1. logits: ``aquila_npu.selfcheck --device cuda`` (our model vs Hugging Face LlamaForCausalLM) in bf16 and fp32;
2. training: one converted tiny checkpoint trained 8 iterations on ``--device cpu`` and ``--device cuda``, fp32 and
   bf16, the per-iteration losses side by side (relative difference);
3. throughput: ``aquila_npu.benchmark`` on Aquila2-7B width, 4 layers, seq 4096, bf16, once per variant
   (``VARIANTS``: plain, the chunked loss, torch.compile of the elementwise regions, the sync-free step, the fused
   SwiGLU, the three switches together, and with micro batch 2), each profiled (where the time goes) with both MFU formulas, its throughput ratio vs plain and its losses
   vs plain; variants left when ``--budget-s`` is spent are skipped, saying so;
4. the machine's own limits, measured in the same run: a bf16 8192^3 GEMM's TFLOP/s and a device copy's GB/s.

Writes ``cuda_check.json`` (and the benchmarks' JSON) under ``--out-dir``. ``--device cpu`` skips 1, 2 and 4 (they
need the GPU); ``--tiny`` runs aquila2-tiny at seq 64 (the script's own test, tests/test_step_switches.py).
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


# name -> (benchmark flags, aquila_npu.pretrain flags); "{chunk}" is the chunk size of the shape
VARIANTS = {
    "plain": ([], []),
    "chunked-loss": ([], ["--loss-chunk-size", "{chunk}"]),
    "compiled": ([], ["--compile-elementwise"]),
    "no-step-syncs": ([], ["--no-step-syncs"]),
    "fused-swiglu": (["--fused", "on", "--fused-switches", "swiglu"], []),
    "all": ([], ["--loss-chunk-size", "{chunk}", "--compile-elementwise", "--no-step-syncs"]),
    "all-mbs2": (["--micro-batch-size", 2], ["--loss-chunk-size", "{chunk}", "--compile-elementwise",
                                             "--no-step-syncs"]),
}
SHAPES = {  # --tiny or not: benchmark flags, chunk size, iterations
    False: (["--model", "aquila2-7b", "--num-layers", 4, "--seq-length", 4096, "--dtype", "bf16",
             "--global-batch-size", 8], 2048, 2, 5),
    True: (["--model", "aquila2-tiny", "--seq-length", 64, "--dtype", "fp32", "--global-batch-size", 4], 24, 1, 2),
}


def cannot(name, device):
    """Why a variant cannot run on this device, or None."""
    if name == "fused-swiglu" and device != "cuda":
        return "the fused SwiGLU switch needs cuda (or an NPU)"
    return None


def variant(name, out_dir, device, tiny):
    shape, chunk, warmup, iters = SHAPES[tiny]
    bench, pretrain = VARIANTS[name]
    argv = [*shape, "--micro-batch-size", 1, *bench, "--warmup", warmup, "--iters", iters, "--device", device,
            "--profile", "--output", os.path.join(out_dir, f"variant-{name.replace('+', '-')}.json")]
    if "--fused" not in bench:
        argv += ["--fused", "off"]
    pretrain = [str(a).format(chunk=chunk) for a in pretrain]
    proc = run([sys.executable, "-m", "aquila_npu.benchmark", *argv, *(["--"] + pretrain if pretrain else [])],
               timeout=420)
    print(proc.stdout[-2500:])
    with open(argv[argv.index("--output") + 1]) as f:
        result = json.load(f)
    r = next(iter(result["runs"].values()))
    return {"name": name, "benchmark_flags": [str(a) for a in bench], "pretrain_flags": pretrain,
            "tokens_per_sec_per_device": r["tokens_per_sec_per_device"], "step_time_s": r["step_time_s"],
            "tflops_per_device": r["tflops_per_device"], "mfu": r.get("mfu"), "mfu_flagperf": r.get("mfu_flagperf"),
            "peak_memory_gb": r.get("peak_memory_gb"), "lm_losses": r.get("lm_losses"),
            "profile": r.get("profile"), "label": result["label"], "settings": result["settings"]}


def throughput(out_dir, device, tiny, names, budget_s):
    """Every variant in turn, each against the first (plain): throughput ratio, largest relative loss difference."""
    started, out, skipped = time.time(), [], {}
    for name in names:
        why = cannot(name, device)
        if why is None and out and time.time() - started > budget_s:
            why = f"the --budget-s {budget_s:.0f} s was spent"
        if why:
            skipped[name] = why
            print(f"  {name}: skipped ({why})")
            continue
        out.append(variant(name, out_dir, device, tiny))
    plain = out[0]
    for v in out:
        v["ratio_vs_plain"] = v["tokens_per_sec_per_device"] / plain["tokens_per_sec_per_device"]
        pairs = list(zip(v["lm_losses"] or [], plain["lm_losses"] or []))
        v["max_rel_loss_diff_vs_plain"] = max((abs(a - b) / abs(b) for a, b in pairs), default=None)
    print(f"\n{'variant':<24} {'tokens/p/s':>11} {'s/step':>8} {'MFU ours':>9} {'FlagPerf':>9} "
          f"{'peak GB':>8} {'ratio vs plain':>15} {'loss rel diff':>14}")
    for v in out:
        mfu = f"{v['mfu']:.1%}" if v["mfu"] is not None else "n/a"
        fp = f"{v['mfu_flagperf']:.1%}" if v["mfu_flagperf"] is not None else "n/a"
        diff = v["max_rel_loss_diff_vs_plain"]
        print(f"{v['name']:<24} {v['tokens_per_sec_per_device']:>11.0f} {v['step_time_s']:>8.3f} {mfu:>9} {fp:>9} "
              f"{v['peak_memory_gb'] or 0:>8.2f} {v['ratio_vs_plain']:>14.2f}x "
              f"{'n/a' if diff is None else f'{diff:.1e}':>14}")
    print(f"(variants in {time.time() - started:.0f} s)")
    return out, skipped


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--skip-benchmark", action="store_true")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda (default: everything) or cpu (the variants only: the script's own check)")
    p.add_argument("--skip-checks", action="store_true",
                   help="only the limits and the variants (no logits / training checks): the short run")
    p.add_argument("--tiny", action="store_true", help="aquila2-tiny at seq 64 instead of Aquila2-7B width")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, the first is the baseline (default {','.join(VARIANTS)})")
    p.add_argument("--budget-s", type=float, default=200.0,
                   help="start no variant after this many seconds of variants (default 200)")
    a = p.parse_args()
    names = [n.strip() for n in a.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise SystemExit(f"--variants {a.variants}: choose from {', '.join(VARIANTS)}")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here (--device cpu checks the script itself)")
    os.makedirs(a.out_dir, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu", "torch": torch.__version__,
              "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d")}
    import megatron.core
    import transformers
    result["megatron_core"] = megatron.core.__version__
    result["transformers"] = transformers.__version__
    work = tempfile.mkdtemp(prefix="cuda-check-")
    if a.device == "cuda":
        result["limits"] = limits()
        if not a.skip_checks:
            result["logits_vs_hf"] = logits(work)
            result["training_cpu_vs_cuda"] = training(work)
    if not a.skip_benchmark:
        result["variants"], result["variants_skipped"] = throughput(a.out_dir, a.device, a.tiny, names, a.budget_s)
    with open(os.path.join(a.out_dir, "cuda_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "variants"}, indent=1))


if __name__ == "__main__":
    main()
