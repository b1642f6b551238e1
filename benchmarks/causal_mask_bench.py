"""The causal-mask change (issue 14), before and after, side by side in one run (docs/benchmark.md, "One causal mask").

    python benchmarks/causal_mask_bench.py [--model aquila2-small] [--seq-length 2048] [--device cpu] [--rounds 2]

*before*: the plain attention as it was: a new [S, S] boolean causal mask built for every layer and micro-batch and
passed to SDPA (which keeps it, inverted, for backward); reproduced here by monkeypatching this process's child,
nothing in the package changes. *after*: the package as it is (SDPA's own causal mode, no mask tensor).

Each variant trains ``aquila_npu.pretrain --mock-data`` in its own process (so each has its own peak memory: host
max RSS on CPU, the allocator's max on a GPU), alternating before / after for ``--rounds`` rounds; per variant the
median step time over the measured iterations of all rounds and the largest peak memory. Prints the after / before
ratios and writes a JSON result.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a file from a checkout

from aquila_npu.benchmarking import environment  # noqa: E402
from aquila_npu.benchmarking.run import Settings, model_spec, peak_memory, pretrain_argv, read_metrics  # noqa: E402

BEFORE = """
from aquila_npu.device import torch_modules as tm
tm.SDPAAttention.needs_causal_mask = True  # SDPA is given the mask
tm.shared_causal_mask = lambda sq, sk, device: tm.causal_mask(sq, sk, device)  # a new one per layer and micro-batch
"""
MAIN = """
import sys
from aquila_npu.cli.pretrain import main
sys.exit(main(sys.argv[1:]))
"""


def train(variant: str, s: Settings, work: str, round_: int) -> dict:
    metrics = os.path.join(work, f"{variant}-{round_}.jsonl")
    spec = model_spec(s.model, s.num_layers, s.seq_length)
    argv = pretrain_argv(s, spec, fused=False, metrics_file=metrics)
    code = (BEFORE if variant == "before" else "") + MAIN
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
               PYTHONWARNINGS="ignore")
    t = time.time()
    proc = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    records = [r for r in read_metrics(metrics) if r["iteration"] > s.warmup]
    out = {"step_times_s": [r["step_time_s"] for r in records], "lm_loss": [r["lm_loss"] for r in records],
           **peak_memory(records)}
    print(f"  {variant} (round {round_}): median step {statistics.median(out['step_times_s']):.2f} s, peak memory "
          f"{out['peak_memory_gb']:.3f} GB ({out['peak_memory_kind']}), {time.time() - t:.0f} s", flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="aquila2-small")
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=2, help="default 2: two micro-batches per step")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default fp32 on cpu, bf16 elsewhere")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="before/after pairs, alternating (default 2)")
    p.add_argument("--output", default=None)
    a = p.parse_args()
    s = Settings(model=a.model, num_layers=a.num_layers, seq_length=a.seq_length, micro_batch_size=a.micro_batch_size,
                 global_batch_size=a.global_batch_size, tp=1, pp=1, nproc=1,
                 dtype=a.dtype or ("fp32" if a.device == "cpu" else "bf16"), device=a.device, warmup=a.warmup,
                 iters=a.iters, fused_switches=[])
    runs = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as work:
        for r in range(a.rounds):
            for variant in ("before", "after"):
                runs[variant].append(train(variant, s, work, r))
    summary = {}
    for variant, rs in runs.items():
        summary[variant] = {"step_time_s": statistics.median(t for r in rs for t in r["step_times_s"]),
                            "peak_memory_gb": max(r["peak_memory_gb"] for r in rs),
                            "peak_memory_kind": rs[0]["peak_memory_kind"]}
    losses_equal = all(b["lm_loss"] == f["lm_loss"] for b, f in zip(runs["before"], runs["after"]))
    ratio = {"step_time": summary["after"]["step_time_s"] / summary["before"]["step_time_s"],
             "peak_memory": summary["after"]["peak_memory_gb"] / summary["before"]["peak_memory_gb"]}
    device = environment.describe(a.device, 1, None)
    result = {"what": "causal mask: before (a [S, S] mask per layer and micro-batch, given to SDPA) vs after (SDPA "
                      "is_causal, no mask tensor)", "device": device, "software": environment.software(a.device),
              "settings": {"model": a.model, "num_layers": model_spec(a.model, a.num_layers).num_layers,
                           "seq_length": a.seq_length, "micro_batch_size": a.micro_batch_size,
                           "global_batch_size": a.global_batch_size, "dtype": s.dtype, "warmup_iters": a.warmup,
                           "iters": a.iters, "rounds": a.rounds, "order": "before, after, alternating"},
              "runs": runs, "summary": summary, "after_over_before": ratio, "losses_equal": losses_equal,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = a.output or os.path.join(ROOT, "benchmarks", "results",
                                   f"causal-mask-{a.device}-{a.model}-seq{a.seq_length}-{time.strftime('%Y%m%d')}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"\nbefore: {summary['before']['step_time_s']:.2f} s/step, {summary['before']['peak_memory_gb']:.3f} GB; "
          f"after: {summary['after']['step_time_s']:.2f} s/step, {summary['after']['peak_memory_gb']:.3f} GB; "
          f"after/before: step time {ratio['step_time']:.3f}x, peak memory {ratio['peak_memory']:.3f}x; "
          f"losses equal: {losses_equal}\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
