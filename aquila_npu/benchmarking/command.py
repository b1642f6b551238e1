"""``python -m aquila_npu.benchmark``'s library call: settings from the flags, the measured runs
(``benchmarking.run``), the JSON result and its table; or saved results compared (``benchmarking.compare``)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import time
from typing import List

from aquila_npu.benchmarking import compare
from aquila_npu.benchmarking.plot import plot
from aquila_npu.benchmarking.run import Settings, run_benchmark
from aquila_npu.benchmarking.switches import SWITCHES
from aquila_npu.errors import MissingDependency, UsageError
from aquila_npu.models.registry import MODELS
from aquila_npu.outputs.files import write_json


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _default_output(result: dict) -> str:
    st = result["settings"]
    name = f"{_slug(result['label'])}-{st['architecture']['name']}-seq{st['seq_length']}-" \
           f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    return os.path.join("benchmarks", "results", name)


def _settings(a: argparse.Namespace, extra: List[str]) -> Settings:
    if a.model.lower() not in MODELS:
        raise UsageError(f"--model {a.model}: unknown model; known: {', '.join(sorted(MODELS))}")
    for flag in ("num_layers", "seq_length", "micro_batch_size", "global_batch_size", "tp", "pp", "nproc", "iters"):
        value = getattr(a, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1")
    if a.warmup < 0:
        raise UsageError("--warmup must be >= 0")
    nproc = a.nproc or a.tp * a.pp
    if nproc % (a.tp * a.pp):
        raise UsageError(f"--nproc {nproc} is not a multiple of --tp {a.tp} x --pp {a.pp}")
    switches = [s.strip() for s in a.fused_switches.split(",") if s.strip()]
    unknown = [s for s in switches if s not in SWITCHES]
    if unknown or not switches:
        raise UsageError(f"--fused-switches {a.fused_switches}: choose from {', '.join(SWITCHES)}")
    from aquila_npu.device.setup import resolve as resolve_device

    device = resolve_device(a.device)
    dtype = a.dtype if a.dtype != "auto" else ("fp32" if device == "cpu" else "bf16")
    return Settings(model=a.model.lower(), num_layers=a.num_layers, seq_length=a.seq_length,
                    micro_batch_size=a.micro_batch_size, global_batch_size=a.global_batch_size, tp=a.tp, pp=a.pp,
                    nproc=nproc, dtype=dtype, device=device, warmup=a.warmup, iters=a.iters,
                    fused_switches=[SWITCHES[s] for s in switches], peak_tflops=a.device_peak_tflops,
                    extra=extra, timeout=a.timeout, profile=bool(getattr(a, "profile", False)))


def mfu_lines(result: dict) -> str:
    """Both MFU formulas side by side, per run: ours (attention included) and FlagPerf's (6 x params)."""
    peak = result["device"].get("peak_tflops")
    rows = [f"MFU vs {peak} TFLOP/s: ours = {result['flops_formula']}; FlagPerf's = {result['flagperf_formula']}"
            if peak else "MFU: n/a (no peak TFLOP/s for this device; --device-peak-tflops gives one)"]
    for tag, r in result["runs"].items():
        if peak:
            rows.append(f"  {tag}: ours {r['mfu']:.1%}, FlagPerf's {r['mfu_flagperf']:.1%}")
    return "\n".join(rows)


def _compare(a: argparse.Namespace) -> int:
    results = [compare.load(path) for path in a.compare]
    print(compare.table(results, a.compare))
    if a.plot:
        print(f"wrote {plot(results, a.plot)}")
    return 0


def run(a: argparse.Namespace) -> int:
    """Run the benchmark the parsed flags describe (``aquila_npu.cli.benchmark``), or compare saved results. A
    measured run that fails is ``BenchmarkFailed`` (exit status 1)."""
    if a.compare:
        return _compare(a)
    if a.plot and importlib.util.find_spec("matplotlib") is None:  # before spending device time
        raise MissingDependency("--plot needs the matplotlib package, which is not installed: pip install matplotlib")
    s = _settings(a, a.pretrain_flags)
    result = run_benchmark(s, fused_mode=a.fused, log_dir=a.log_dir, label=a.label)
    out = a.output or _default_output(result)
    write_json(out, result, "the benchmark result", indent=1)
    print()
    print(compare.table([result]))
    print(mfu_lines(result))
    for tag, r in result["runs"].items():
        if r.get("profile"):
            from aquila_npu.training.profile import table

            print(f"\n{tag} run: " + table(r["profile"]))
    fv = result["fused_vs_unfused"]
    if fv is not None:
        print(f"\nfused / unfused throughput: {fv['throughput_ratio']:.2f}x" if fv["available"] else
              f"\nfused / unfused: not measured (no fused kernels on {s.device}; see the note above)")
    ov = result.get("overlap_on_vs_off")
    if ov is not None:
        print(f"communication overlap on / off throughput: {ov['throughput_ratio']:.2f}x" if ov["available"] else
              f"communication overlap on / off: not measured ({ov['reason']})")
    print(f"\nwrote {out}")
    if a.plot:
        print(f"wrote {plot([result], a.plot)}")
    return 0
