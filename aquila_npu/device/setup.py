"""Pick the device once at start-up: npu, cuda or cpu.

``setup()`` chooses the device (auto-detected, or ``--device`` / ``AQUILA_DEVICE``), applies the redirection
megatron-core needs off CUDA, initialises torch.distributed with hccl / nccl / gloo, and returns a ``Device`` whose
``backend`` is the megatron-core ``BackendSpecProvider`` for the model's layer spec.
"""

from __future__ import annotations

import datetime
import importlib
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from aquila_npu.compat import journal
from aquila_npu.compat import megatron_core as compat_mcore
from aquila_npu.compat import torch as compat_torch
from aquila_npu.compat import versions
from aquila_npu.device import DEVICES, DIST_BACKENDS, npu_runtime
from aquila_npu.device.backends import FusedOps, TorchBackend, make_backend
from aquila_npu.errors import DeviceUnavailable, UsageError
from aquila_npu.ports import free_port



@dataclass
class Device:
    name: str  # where tensors live: npu / cuda / cpu
    backend: TorchBackend  # which modules the model is built from
    dist_backend: str
    torch_device: torch.device
    runtime: Tuple[npu_runtime.Applied, ...] = ()  # the NPU runtime settings applied (device/npu_runtime.py)

    @property
    def kernels(self) -> str:
        return self.backend.name

    def runtime_line(self) -> Optional[str]:
        """The banner line of the NPU runtime settings (None off the NPU)."""
        return npu_runtime.describe(list(self.runtime)) if self.runtime else None


def npu_available() -> bool:
    """True when torch_npu imports (needs Ascend CANN) and sees at least one NPU."""
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        import torch_npu  # noqa: F401
        return torch.npu.is_available()
    except Exception:
        return False


def detect() -> str:
    if npu_available():
        return "npu"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def resolve(device: Optional[str] = None) -> str:
    device = (device or os.environ.get("AQUILA_DEVICE") or "auto").lower()
    if device == "auto":
        return detect()
    if device not in DEVICES:
        raise UsageError(f"--device {device!r}: choose one of auto, {', '.join(DEVICES)}")
    if device == "npu" and not npu_available():
        raise DeviceUnavailable("--device npu: torch_npu is not importable or sees no NPU (install torch_npu "
                                "matching torch and source CANN's set_env.sh)")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("--device cuda: torch sees no CUDA GPU")
    return device


def init_distributed(dist_backend: str, timeout_minutes: int = 30) -> None:
    """torch.distributed from torchrun's environment, or a one-process group when not launched by torchrun."""
    if torch.distributed.is_initialized():
        return
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "RANK" in os.environ:
        torch.distributed.init_process_group(backend=dist_backend, timeout=timeout)
    else:  # one process; the environment is left alone, so child processes do not inherit a rank or a used port
        torch.distributed.init_process_group(backend=dist_backend, timeout=timeout, rank=0, world_size=1,
                                             init_method=f"tcp://127.0.0.1:{free_port()}")


def _npu_runtime_settings(device: Optional[str]) -> Tuple[npu_runtime.Applied, ...]:
    """Set the NPU runtime's environment (device/npu_runtime.py; the user's values kept) when the NPU may be used:
    ``--device npu``, or auto with torch_npu installed. CANN, HCCL and torch_npu read them when torch_npu is imported
    and when the device and communicators start."""
    requested = (device or os.environ.get("AQUILA_DEVICE") or "auto").lower()
    if requested != "npu" and not (requested == "auto" and importlib.util.find_spec("torch_npu") is not None):
        return ()
    npu_runtime.check()
    runtime = tuple(npu_runtime.plan())
    for applied in runtime:
        if applied.name != npu_runtime.JIT_ENV:
            journal.set_env(applied.name, applied.value)  # (a value already in the environment is kept)
    return runtime


def setup(device: Optional[str] = None, fused: FusedOps = FusedOps(), *, distributed: bool = True) -> Device:
    """Select the device and prepare torch / megatron-core for it (``aquila_npu.compat``: what each device needs
    changed in them). Call once, before building models."""
    versions.require("torch", "megatron-core")
    runtime = _npu_runtime_settings(device)  # before anything imports torch_npu (resolve may)
    name = resolve(device)
    backend = make_backend(name, fused)  # raises on a fused switch the device cannot provide
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "npu":
        compat_torch.import_torch_npu()  # with transfer_to_npu: torch.cuda -> torch.npu, nccl -> hccl
        torch.npu.set_compile_mode(jit_compile=npu_runtime.jit_compile())
        compat_mcore.adapt_to_npu()
        torch.npu.set_device(local_rank)
        torch_device = torch.device("npu", local_rank)
    elif name == "cuda":
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        compat_mcore.redirect_cuda_to_cpu()
        compat_mcore.cpu_inference_linears_on_onednn()
        torch_device = torch.device("cpu")
    compat_mcore.grad_norm_without_host_syncs()
    if backend.rope_fn() is not None:
        compat_mcore.provide_fused_rope(backend.rope_fn())
    if distributed:
        init_distributed(DIST_BACKENDS[name])
    return Device(name=name, backend=backend, dist_backend=DIST_BACKENDS[name], torch_device=torch_device,
                  runtime=runtime if name == "npu" else ())
