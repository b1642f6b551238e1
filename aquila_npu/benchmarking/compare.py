"""Saved benchmark results side by side: one row per measured run (unfused / fused) of each file, as the ModelLink
README's throughput table (device, model, iterations, tokens/p/s, s/step), plus TFLOP/s, MFU, peak memory and the
throughput ratio to the first row."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import List, Optional

from aquila_npu.benchmarking.environment import CPU_NOTE
from aquila_npu.benchmarking.run import SCHEMA
from aquila_npu.errors import ResultError


@dataclass
class Row:
    device: str
    model: str
    setup: str
    kernels: str
    iters: int
    tokens_per_sec: float
    step_time_s: float
    tflops: float
    mfu: Optional[float]
    memory_gb: Optional[float]
    is_cpu: bool
    source: str


def load(path: str) -> dict:
    try:
        with open(path) as f:
            result = json.load(f)
    except FileNotFoundError:
        raise ResultError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ResultError(f"{path}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise ResultError(f"{path}: not JSON ({e})") from None
    if not isinstance(result, dict) or result.get("schema") != SCHEMA:
        raise ResultError(f"{path}: not a benchmark result (expected \"schema\": \"{SCHEMA}\"; write one with "
                          "python -m aquila_npu.benchmark --output)")
    if not result.get("runs"):
        raise ResultError(f"{path}: holds no measured run")
    return result


def rows(results: List[dict], sources: Optional[List[str]] = None) -> List[Row]:
    out = []
    for i, res in enumerate(results):
        st, dev = res["settings"], res["device"]
        setup = (f"seq {st['seq_length']}, gbs {st['global_batch_size']}, {st['dtype']}, "
                 f"tp{st['tensor_model_parallel_size']} pp{st['pipeline_model_parallel_size']} "
                 f"dp{st['data_parallel_size']}")
        count = f"{dev['count']} x " if dev.get("count", 1) > 1 else ""
        for tag in ("unfused", "fused"):
            run = res["runs"].get(tag)
            if run is None:
                continue
            out.append(Row(device=count + res["label"], model=st["architecture"]["name"], setup=setup, kernels=tag,
                           iters=len(run["step_times_s"]), tokens_per_sec=run["tokens_per_sec_per_device"],
                           step_time_s=run["step_time_s"], tflops=run["tflops_per_device"], mfu=run.get("mfu"),
                           memory_gb=run.get("peak_memory_gb"), is_cpu=bool(dev.get("is_cpu")),
                           source=sources[i] if sources else ""))
    return out


def fmt(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def table(results: List[dict], sources: Optional[List[str]] = None) -> str:
    """A Markdown table of every run, with tokens/p/s relative to the first row, and notes below it."""
    rs = rows(results, sources)
    first = rs[0].tokens_per_sec
    head = ["Device", "Model", "Setup", "Kernels", "Iters", "tokens/p/s", "s/step", "TFLOP/s/device", "MFU",
            "Peak mem (GB)", "vs first"]
    body = [[r.device, r.model, r.setup, r.kernels, str(r.iters), fmt(r.tokens_per_sec), f"{r.step_time_s:.3g}",
             f"{r.tflops:.3g}", f"{100 * r.mfu:.1f}%" if r.mfu is not None else "n/a",
             f"{r.memory_gb:.2f}" if r.memory_gb is not None else "n/a", f"{r.tokens_per_sec / first:.2f}x"]
            for r in rs]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)]
    notes = []
    for res in results:
        fv = res.get("fused_vs_unfused")
        if fv and fv.get("available"):
            notes.append(f"{res['label']}: fused / unfused throughput {fv['throughput_ratio']:.2f}x")
        elif fv:
            notes.append(f"{res['label']}: no fused run ({fv['reason']})")
        ov = res.get("overlap_on_vs_off")
        if ov and ov.get("available"):
            notes.append(f"{res['label']}: communication overlap on / off throughput {ov['throughput_ratio']:.2f}x")
        elif ov:
            notes.append(f"{res['label']}: no overlap comparison ({ov['reason']})")
    if any(r.is_cpu for r in rs):
        notes.append(CPU_NOTE)
    if len({(r.model, r.setup.split(",")[0]) for r in rs}) > 1:
        notes.append("rows differ in model or sequence length: compare TFLOP/s/device or MFU, not tokens/p/s")
    notes.append("tokens/p/s = tokens per second per device; s/step = median seconds per global batch after "
                 "warm-up; MFU = model TFLOP/s / device peak; peak memory: device max allocated (host RSS on CPU)")
    return "\n".join(out + [""] + [f"- {n}" for n in notes])
