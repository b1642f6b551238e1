"""A PNG bar chart of benchmark results: tokens/s per device and model TFLOP/s per device, one bar per run.
Needs matplotlib (an optional dependency: pip install matplotlib)."""

from __future__ import annotations

import os
from typing import List

from aquila_npu.benchmarking.compare import fmt, rows
from aquila_npu.errors import MissingDependency


def plot(results: List[dict], path: str) -> str:
    try:
        import matplotlib
    except ImportError:
        raise MissingDependency("--plot needs the matplotlib package, which is not installed: "
                              "pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = rows(results)
    labels = [f"{r.device}\n{r.model}, {r.kernels}" + ("\n(CPU)" if r.is_cpu and "CPU" not in r.device else "")
              for r in rs]
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 2.6 * len(rs) + 3), 4.8))
    for ax, values, title in ((axes[0], [r.tokens_per_sec for r in rs], "tokens/s per device"),
                              (axes[1], [r.tflops for r in rs], "model TFLOP/s per device")):
        bars = ax.bar(range(len(rs)), values, color=["#9e9e9e" if r.is_cpu else "#1f77b4" for r in rs])
        ax.bar_label(bars, labels=[fmt(v) for v in values], fontsize=8)
        ax.set_xticks(range(len(rs)), labels, fontsize=7)
        ax.set_title(title)
        ax.margins(y=0.15)
    if any(r.is_cpu for r in rs):
        fig.text(0.5, 0.01, "grey: CPU figures (functional check, not accelerator throughput)", ha="center",
                 fontsize=8)
    fig.suptitle("Aquila2 training throughput (aquila_npu.benchmark)")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
