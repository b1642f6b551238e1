"""What a benchmark ran on: the device (kind, name, count, peak) and the software versions.

Queried in the benchmark's own process after the measured runs, so the parent never holds an accelerator context
while the training subprocess measures."""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import platform
import re
import subprocess
from typing import Optional

import torch

from aquila_npu.device.backends import FusedOps, make_backend

from aquila_npu.errors import FusedKernelUnavailable
from aquila_npu.flops import device_peak

CPU_NOTE = ("CPU figures: a functional check on a host CPU (fp32, no tensor cores), not accelerator throughput; "
            "no MFU (no CPU peak in the table)")


def _version(*dists: str) -> Optional[str]:
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(kind: str) -> str:
    if kind == "cuda":
        return torch.cuda.get_device_name(0)
    if kind == "npu":
        import torch_npu  # noqa: F401  (registers torch.npu)

        return torch.npu.get_device_name(0)
    return cpu_model()


def fused_unavailable(kind: str, fused: FusedOps) -> Optional[str]:
    """Why ``kind`` cannot build the fused modules (the training entry point's own check), or None."""
    try:
        make_backend(kind, fused)
    except FusedKernelUnavailable as e:
        return str(e)
    return None


def _cann_version() -> Optional[str]:
    roots = [os.environ.get("ASCEND_TOOLKIT_HOME"), "/usr/local/Ascend/ascend-toolkit/latest"]
    for root in filter(None, roots):
        for info in sorted(glob.glob(os.path.join(root, "*", "ascend_toolkit_install.info"))
                           + glob.glob(os.path.join(root, "version.cfg"))):
            try:
                with open(info) as f:
                    m = re.search(r"version\s*=\s*\[?([^\]\s]+)", f.read())
            except OSError:
                continue
            if m:
                return m.group(1)
    return None


def _nvidia_driver() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def software(kind: str) -> dict:
    sw = {"python": platform.python_version(), "torch": torch.__version__,
          "megatron_core": _version("megatron-core", "megatron_core")}
    if kind == "cuda":
        sw.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), nvidia_driver=_nvidia_driver(),
                  transformer_engine=_version("transformer_engine", "transformer-engine"))
        try:
            sw["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001 - a build without NCCL
            sw["nccl"] = None
    if kind == "npu":
        sw.update(torch_npu=_version("torch_npu", "torch-npu"), cann=_cann_version())
    return sw


def describe(kind: str, nproc: int, peak_override: Optional[float]) -> dict:
    """The ``device`` entry of a result."""
    name = device_name(kind)
    found = device_peak(None if kind == "cpu" else name, peak_override)
    peak, source = found.tflops, found.source
    label = f"CPU: {name} ({os.cpu_count()} cores)" if kind == "cpu" else name
    out = {"kind": kind, "name": name, "label": label, "count": nproc, "peak_tflops": peak, "peak_source": source,
           "is_cpu": kind == "cpu"}
    if kind == "cpu":
        out.update(cores=os.cpu_count(), note=CPU_NOTE)
    out["host"] = {"cpu": cpu_model(), "cores": os.cpu_count(),
                   "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    return out
