"""The first-hour report: run every check in child processes on this node's devices and build one report.

Each check runs in its own process(es) (``torchrun`` over all devices where it needs several), with a time limit, so
that one failure (a kernel error, a hung collective) is reported and the others still run. The report is a dict
(``--out`` writes it as JSON) and ``format_report`` prints it.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from typing import Callable, Dict, List, Optional

from aquila_npu.errors import BenchmarkFailed

CHECKS = ("ops", "collectives", "logits", "training", "benchmark")
SCHEMA = "aquila_npu.selfcheck/1"


def device_count(device: str) -> int:
    """Devices on this node (1 for the CPU)."""
    if device == "npu":
        import torch_npu  # noqa: F401  (registers torch.npu)
        import torch

        return torch.npu.device_count()
    if device == "cuda":
        import torch

        return torch.cuda.device_count()
    return 1


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _launch(tag: str, module: str, nproc: int, argv: List[str], workdir: str, timeout: Optional[float]) -> None:
    from aquila_npu.launch import launch_command, run_logged

    log = os.path.join(workdir, f"{tag}.log")
    if run_logged(launch_command(nproc, [str(a) for a in argv], module=module), log, timeout) != 0:
        with open(log) as f:
            tail = "".join(f.readlines()[-15:])
        raise BenchmarkFailed(f"exited with an error; log: {log}\n{tail}")


def check_ops(device: str, nproc: int, dtype: str, workdir: str, timeout, comm_size_mb) -> dict:
    if device != "npu":
        return {"status": "skip", "summary": f"no Ascend fused kernels on {device}"}
    out = os.path.join(workdir, "ops.json")
    _launch("ops", "aquila_npu.checks.worker", 1, ["ops", "--device", device, "--out", out], workdir, timeout)
    results = _read(out)["results"]
    bad = [f"{r['op']} {r['dtype']}" for r in results if not r["ok"]]
    summary = (f"{len(results) - len(bad)}/{len(results)} op x dtype within tolerance (forward and backward vs the "
               "plain path in fp32)" + (f"; out of tolerance: {', '.join(bad)}" if bad else ""))
    return {"status": "fail" if bad else "pass", "results": results, "summary": summary}


def check_collectives(device: str, nproc: int, dtype: str, workdir: str, timeout, comm_size_mb) -> dict:
    out = os.path.join(workdir, "collectives.json")
    _launch("collectives", "aquila_npu.checks.worker", nproc,
            ["collectives", "--device", device, "--out", out, "--size-mb", comm_size_mb], workdir, timeout)
    r = _read(out)
    bw = r["all_reduce_bandwidth"]
    bad = [f"{x['op']} {x['dtype']}" + (f" ({x['error']})" if x.get("error") else "") for x in r["results"]
           if not x["ok"]]
    summary = (f"{len(r['results'])} collective x dtype pairs the code uses on {r['world_size']} ranks "
               f"({r['backend']}): {r['failures_all_ranks']:.0f} wrong or failed on some rank"
               + (f" (rank 0: {'; '.join(bad)})" if bad else "") + f"; all-reduce {comm_size_mb:g} MiB bus "
               "bandwidth " + ", ".join(f"{k} {v['busbw_gb_s']:.1f} GB/s" for k, v in bw.items()))
    return {"status": "fail" if r["failures_all_ranks"] else "pass", "summary": summary, **r}


def check_logits(device: str, nproc: int, dtype: str, workdir: str, timeout, comm_size_mb) -> dict:
    from aquila_npu.checks import logits
    from aquila_npu.models.registry import get_model_spec

    groups = get_model_spec(logits.MODEL).num_key_value_heads  # tp splits the model's key/value heads
    tp = max(t for t in (1, 2, 4, 8) if t <= nproc and nproc % t == 0 and groups % t == 0)
    out = os.path.join(workdir, "logits.json")
    _launch("logits", "aquila_npu.selfcheck", tp, ["--tp", tp, "--device", device, "--dtype", dtype, "--out", out],
            workdir, timeout)
    r = _read(out)
    return {"status": "pass" if r["ok"] else "fail", **r,
            "summary": f"tp{tp} {dtype}: max |ours - HF| = {r['max_abs_diff']:.3g} (tolerance {r['tolerance']:g}), "
                       f"argmax agreement {r['argmax_agree']:.0%}"}


def check_training(device: str, nproc: int, dtype: str, workdir: str, timeout, comm_size_mb) -> Dict[str, dict]:
    from aquila_npu.checks import training

    if nproc not in training.TP_SIZES:
        reason = f"needs 1, 2, 4 or 8 devices (tp over all of them), this node has {nproc}"
        return {"training": {"status": "skip", "summary": reason}, "resume": {"status": "skip", "summary": reason}}
    folder = os.path.join(workdir, "training")
    os.makedirs(folder, exist_ok=True)
    r = training.run(device, nproc, dtype, folder, timeout)
    t, s = r["training"], r["resume"]
    t.update(status="pass" if t["ok"] else "fail",
             summary=f"tp{t['tp']} {dtype}, {len(t['losses'])} iterations: losses and gradient norms within "
                     f"{t['max_rel_err']:.2g} of the CPU reference (tolerance {t['tolerance']:g})")
    s.update(status="pass" if s["ok"] else "fail",
             summary=f"saved at iteration {s['saved_at']}, resumed: the next iterations "
                     + ("repeat bit for bit" if s["ok"] else f"differ: {s['resumed']} vs {s['straight']}"))
    return r


def check_benchmark(device: str, nproc: int, dtype: str, workdir: str, timeout, comm_size_mb) -> dict:
    from aquila_npu.benchmarking.run import Settings, run_benchmark
    from aquila_npu.device.backends import FusedOps

    s = Settings(model="aquila2-tiny", num_layers=None, seq_length=None, micro_batch_size=1, global_batch_size=None,
                 tp=1, pp=1, nproc=1, dtype=dtype, device=device, warmup=2, iters=5,
                 fused_switches=list(FusedOps.KERNELS), timeout=timeout)  # tp1: no MC2
    result = run_benchmark(s, fused_mode="both", log_dir=os.path.join(workdir, "benchmark"), echo=lambda *a: None)
    parts = [f"{tag} {r['tokens_per_sec_per_device']:.0f} tokens/s" for tag, r in result["runs"].items()]
    fv = result["fused_vs_unfused"]
    if fv and fv["available"]:
        parts.append(f"fused/unfused {fv['throughput_ratio']:.2f}x")
    return {"status": "done", "result": result,
            "summary": f"aquila2-tiny on 1 x {result['label']}, {dtype}: " + ", ".join(parts)
                       + " (a smoke test of the benchmark; measure real models with python -m aquila_npu.benchmark)"}


RUNNERS: Dict[str, Callable] = {"ops": check_ops, "collectives": check_collectives, "logits": check_logits,
                                "training": check_training, "benchmark": check_benchmark}


def run_report(device: str, *, nproc: int, dtype: str, checks=CHECKS, workdir: Optional[str] = None,
               timeout: Optional[float] = 1800, comm_size_mb: float = 64.0, echo=print) -> dict:
    """Run ``checks`` on ``device`` with ``nproc`` devices; the report dict. Logs stay in ``workdir`` (a temporary
    folder, removed when every check passed, unless given)."""
    from aquila_npu.benchmarking import environment

    folder = workdir or tempfile.mkdtemp(prefix="aquila-selfcheck-")
    os.makedirs(folder, exist_ok=True)
    report = {"schema": SCHEMA, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": device, "nproc": nproc,
              "dtype": dtype, "host": platform.node(), "software": environment.software(device), "checks": {}}
    for name in checks:
        echo(f"selfcheck: {name} ...")
        t0 = time.perf_counter()
        try:
            out = RUNNERS[name](device, nproc, dtype, folder, timeout, comm_size_mb)
        except Exception as e:  # noqa: BLE001 - a failed check is a result; the others still run
            out = {"status": "error", "summary": f"{type(e).__name__}: {e}"}
        results = out if name == "training" and "training" in out else {name: out}
        for key, value in results.items():
            value["seconds"] = round(time.perf_counter() - t0, 1)
            report["checks"][key] = value
    report["device_name"] = environment.device_name(device)
    if device == "npu":  # the version the imported module reports (also when no package metadata is installed)
        import torch_npu

        report["software"]["torch_npu"] = report["software"].get("torch_npu") or torch_npu.__version__
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report["failed"] = [k for k, v in report["checks"].items() if v["status"] in ("fail", "error")]
    report["passed"] = not report["failed"]
    report["logs"] = folder if (workdir or report["failed"]) else None
    if not report["logs"]:
        shutil.rmtree(folder, ignore_errors=True)
    return report


def format_report(report: dict) -> str:
    sw = report["software"]
    versions = ", ".join(f"{k} {v}" for k, v in sw.items() if v)
    lines = [f"aquila_npu selfcheck report: {report['nproc']} x {report['device_name']} ({report['device']}), "
             f"{report['dtype']}", f"  software: {versions}"]
    for name, c in report["checks"].items():
        lines.append(f"  {name:<12} {c['status'].upper():<5} {c['summary']}")
        for r in c.get("results", []) if name == "ops" else []:
            lines.append(f"      {r['op']:<46} {r['dtype']:<9} forward {r['forward']:.1e}  backward "
                         f"{r['backward']:.1e}  (tolerance {r['tolerance']:g}){'' if r['ok'] else '  FAIL'}")
    lines.append("verdict: " + ("every check passed" if report["passed"] else
                                f"{len(report['failed'])} failed: {', '.join(report['failed'])}")
                 + (f"; logs in {report['logs']}" if report["logs"] else ""))
    return "\n".join(lines)
