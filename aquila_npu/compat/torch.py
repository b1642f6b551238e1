"""torch and torch_npu: what aquila_npu replaces in them or calls that is not their public API (``RECORDS``).

* **Device calls sent elsewhere** (one mechanism, ``redirect_device_arguments``): megatron-core and libraries written
  for CUDA pass ``device='cuda'`` (or ``'cuda:N'``, ``torch.device('cuda', N)``, an index) to tensor factories,
  ``Tensor.to`` and friends. The CPU sends them to the CPU (``redirect_cuda_to_cpu``); the fake torch_npu runtime of
  the tests sends ``npu`` to the CPU (its device is an alias of the CPU) and imitates ``transfer_to_npu`` (cuda to
  npu) with the same function. On a real NPU, torch_npu's own ``transfer_to_npu`` does the cuda-to-npu part.
* **torch.cuda on a host** (``HostEvent``, ``HostStream`` and the ``torch.cuda`` functions megatron-core calls): the
  CPU answers them without a device; the fake NPU runtime uses the same stand-ins.
* **Type names**: megatron-core checks ``param.type() == 'torch.cuda.FloatTensor'`` (grad clipping, the optimizers):
  ``report_type_as_cuda`` makes CPU or NPU tensors answer with the CUDA name.
* **oneDNN's linear** (``onednn_linear``): the private op torch's own compiler emits for CPU linears.
* **HCCL communicator names** (``hccl_comm_name``): the MC2 kernels take the communicator of a process group.
* **megatron-core's import-time ``torch.compile``** (``import_megatron_core``): deferred to each function's first call.
* **torch_npu** (``import_torch_npu``): ``torch_npu`` and its ``transfer_to_npu``, the version pair checked, and the
  ``TORCH_NPU_DEVICE_CAPABILITY`` torch's collectives need.

Every change goes through ``compat.journal`` (``undo_all`` restores it). Nothing runs on import.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import time
from typing import Any, Callable, Iterable, Optional

import torch

from aquila_npu.compat import journal, versions
from aquila_npu.compat.record import Replacement

TORCH = "torch 2.13.0 (and 2.6.0)"
TORCH_NPU = "torch_npu 2.13.0 (docs and contrib/transfer_to_npu.py)"

RECORDS = (
    Replacement("torch:empty", "wrapped",
                "on the CPU, tensor factories called with device='cuda' by megatron-core allocate on the CPU "
                "(redirect_cuda_to_cpu; the same wrapper sends the fake NPU's 'npu' to the CPU)", TORCH,
                "tests/test_backends.py::test_patches_are_opt_in_and_undoable"),
    Replacement("torch:Tensor.to", "wrapped", "device='cuda' / .to('cuda') on the CPU stays on the CPU", TORCH,
                "tests/test_backends.py::test_patches_are_opt_in_and_undoable"),
    Replacement("torch:Tensor.type", "wrapped",
                "megatron-core compares param.type() with 'torch.cuda.FloatTensor' in grad clipping and its "
                "optimizers: CPU (and NPU) tensors answer with the CUDA name when asked without arguments", TORCH,
                "tests/test_pretrain.py"),
    Replacement("torch:cuda.current_device", "replaced",
                "megatron-core calls torch.cuda's device, RNG, stream, event and memory functions unconditionally; on "
                "the CPU they answer for the host (HostEvent, HostStream)", TORCH,
                "tests/test_backends.py::test_patches_are_opt_in_and_undoable"),
    Replacement("torch:ops.mkldnn._linear_pointwise", "called",
                "oneDNN's fp32 linear, 2-2.9x MKL's sgemm for these models' shapes on our AMD EPYC CPUs; the op "
                "torch's own compiler emits for CPU linears (no public eager API reaches it)", TORCH,
                "tests/test_onednn.py"),
    Replacement("torch:_foreach_norm", "called",
                "the per-tensor norms of torch.nn.utils.clip_grad_norm_, on the device, for the gradient norm without "
                "one host sync per tensor (compat.megatron_core.l2_norm_on_device)", TORCH,
                "tests/test_training_speed.py"),
    Replacement("torch.utils._device:_device_constructors", "called",
                "torch's own list of the functions that take device= (what its DeviceContext intercepts): the fake "
                "NPU runtime wraps exactly those", TORCH, "tests/test_npu_runtime.py", "()"),
    Replacement("torch.distributed:ProcessGroup._get_backend", "called",
                "the HCCL communicator of a process group, whose name torch_npu's MC2 kernels take as hcom (as "
                "MindSpeed asks it)", TORCH_NPU, "tests/test_npu_emulator.py::test_mc2_kernels_on_two_processes"),
    Replacement("torch:compile", "replaced",
                "only while megatron.core.jit is imported: its jit_fuser decorations then compile at first call "
                "instead of importing dynamo and inductor at import (0.9 s of start-up)", TORCH,
                "tests/test_startup.py"),
    Replacement("torch:cuda.get_device_capability", "bound",
                "torch's dist.broadcast indexes get_device_capability() for is_cuda tensors, which NPU tensors are "
                "under transfer_to_npu; torch_npu answers None unless TORCH_NPU_DEVICE_CAPABILITY is set (set to 8.0 "
                "unless the user set it)", TORCH_NPU, "tests/test_npu_runtime.py"),
)

# ----------------------------------------------------------------------------------------------------------------
# Device arguments: the one redirection mechanism
# ----------------------------------------------------------------------------------------------------------------

DEVICE_KWARGS = ("device", "device_type", "map_location", "device_id")  # transfer_to_npu's list


def map_device(value: Any, source: str, target: str, *, ints: bool = False) -> Any:
    """``value`` with device ``source`` named ``target`` (strings, ``torch.device``, ``map_location`` dicts and, with
    ``ints``, bare indices); everything else unchanged. To the CPU the index is dropped; to another device it is
    kept (``cuda:3`` -> ``npu:3``)."""
    if isinstance(value, str):
        if value == source or value.startswith(source + ":"):
            return "cpu" if target == "cpu" else target + value[len(source):]
        return value
    if isinstance(value, torch.device):
        if value.type != source:
            return value
        return torch.device("cpu") if target == "cpu" else torch.device(target, value.index)
    if ints and isinstance(value, int) and not isinstance(value, bool):
        return "cpu" if target == "cpu" else f"{target}:{value}"
    if isinstance(value, dict):
        return {map_device(k, source, target): map_device(v, source, target) for k, v in value.items()}
    return value


def redirecting(fn: Callable, source: str, target: str, *, ints_in_args: bool = False,
                ints_in_kwargs: bool = True) -> Callable:
    """``fn`` with every positional argument and device keyword (``DEVICE_KWARGS``, and ``device_ids`` lists) that
    names device ``source`` naming ``target``. Bare ints count as device indices in the keywords (unless
    ``ints_in_kwargs`` is False), and in the positional arguments with ``ints_in_args`` (``Tensor.to(0)``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args = tuple(map_device(a, source, target, ints=ints_in_args) for a in args)
        for key in DEVICE_KWARGS:
            if kwargs.get(key) is not None:
                kwargs[key] = map_device(kwargs[key], source, target, ints=ints_in_kwargs)
        ids = kwargs.get("device_ids")
        if isinstance(ids, (list, tuple)):
            kwargs["device_ids"] = type(ids)(map_device(d, source, target, ints=ints_in_args) for d in ids)
        return fn(*args, **kwargs)

    return wrapper


def redirect_device_arguments(owner: Any, names: Iterable[str], source: str, target: str, *,
                              ints_in_args: bool = False, ints_in_kwargs: bool = True, journaled: bool = True) -> None:
    """Wrap each ``owner.<name>`` that exists with ``redirecting``. ``journaled=False`` for what can never be undone
    (the fake NPU runtime: one privateuse1 backend per process)."""
    for name in names:
        fn = getattr(owner, name, None)
        if fn is None:
            continue
        new = redirecting(fn, source, target, ints_in_args=ints_in_args, ints_in_kwargs=ints_in_kwargs)
        if journaled:
            journal.set_attr(owner, name, new)
        else:
            setattr(owner, name, new)


def device_constructors() -> list:
    """The names of torch's functions that take ``device=`` (torch's own list), plus the ``*_like`` ones."""
    from torch.utils._device import _device_constructors

    names = {fn.__name__ for fn in _device_constructors() if getattr(torch, fn.__name__, None) is fn}
    names |= {n for n in dir(torch) if n.endswith("_like") and callable(getattr(torch, n))}
    return sorted(names)


# megatron-core 0.16.1's factory calls with device='cuda' (and torch.cuda.current_device()): these cover them.
CPU_FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint", "as_tensor",
                 "empty_like", "zeros_like", "ones_like", "full_like", "randn_like", "rand_like", "linspace")

# ----------------------------------------------------------------------------------------------------------------
# torch.cuda answered by the host
# ----------------------------------------------------------------------------------------------------------------


class HostEvent:
    """Stand-in for torch.cuda.Event: wall-clock timing on the host (also the fake NPU runtime's Event)."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self.time = None

    def record(self, stream=None):
        self.time = time.perf_counter()

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, end: "HostEvent") -> float:
        return (end.time - self.time) * 1000.0


class HostStream:
    """Stand-in for a device stream where work runs at once on the host: waiting and synchronising are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        event = event or HostEvent()
        event.record()
        return event


def report_type_as_cuda(prefix: str) -> None:
    """Make ``tensor.type()`` (no arguments) name ``prefix`` tensors (``torch.`` on the CPU, ``torch.npu.`` on an NPU)
    as CUDA ones, for megatron-core's checks."""
    names = {f"{prefix}{kind}Tensor": f"torch.cuda.{kind}Tensor" for kind in ("Float", "Half", "BFloat16")}
    tensor_type = torch.Tensor.type

    def type_(self, *args, **kwargs):
        if args or kwargs:
            return tensor_type(self, *args, **kwargs)
        name = tensor_type(self)
        return names.get(name, name)

    journal.set_attr(torch.Tensor, "type", type_)


def redirect_cuda_to_cpu() -> None:
    """Let CUDA-only code paths (megatron-core's) run on the CPU: torch.cuda's functions answer for the host, device
    arguments naming cuda name the CPU, CPU tensors report CUDA type names. Idempotent."""
    if journal.done("cpu"):
        return
    cpu = torch.device("cpu")
    host = {
        "current_device": lambda: cpu, "set_device": lambda *a, **k: None, "synchronize": lambda *a, **k: None,
        "empty_cache": lambda *a, **k: None, "device_count": lambda: 0,
        "manual_seed": lambda seed: torch.default_generator.manual_seed(int(seed)),
        "get_rng_state": lambda device="cuda": torch.get_rng_state(),
        "set_rng_state": lambda state, device="cuda": torch.set_rng_state(state),
        "Event": HostEvent, "Stream": HostStream, "current_stream": lambda *a, **k: HostStream(),
        "default_stream": lambda *a, **k: HostStream(), "stream": lambda *a, **k: contextlib.nullcontext(),
        "memory_allocated": lambda *a, **k: 0, "max_memory_allocated": lambda *a, **k: 0,
        "memory_reserved": lambda *a, **k: 0, "max_memory_reserved": lambda *a, **k: 0,
    }
    # Not torch.cuda.manual_seed_all: torch.manual_seed calls it (a stand-in calling torch.manual_seed would recurse).
    for name, value in host.items():
        journal.set_attr(torch.cuda, name, value)
    redirect_device_arguments(torch, CPU_FACTORIES, "cuda", "cpu")
    redirect_device_arguments(torch.Tensor, ("to",), "cuda", "cpu", ints_in_args=True)
    journal.set_attr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    journal.set_attr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    report_type_as_cuda("torch.")
    journal.mark("cpu")


# ----------------------------------------------------------------------------------------------------------------
# torch_npu
# ----------------------------------------------------------------------------------------------------------------


def import_torch_npu():
    """Import torch_npu and its ``transfer_to_npu`` (torch.cuda -> torch.npu, nccl -> hccl, device arguments), check
    the torch / torch_npu pair, and set ``TORCH_NPU_DEVICE_CAPABILITY`` (8.0 unless the user set it: torch 2.13's
    ``dist.broadcast`` reads ``get_device_capability()[0]`` for is_cuda tensors, which NPU tensors are under
    transfer_to_npu, and torch_npu answers None without it; 8.0: no sm90 fp8 path, bf16 supported)."""
    torch_npu = importlib.import_module("torch_npu")
    versions.require_torch_npu(torch_npu)
    importlib.import_module("torch_npu.contrib.transfer_to_npu")
    journal.set_env("TORCH_NPU_DEVICE_CAPABILITY", "8.0")
    return torch_npu


def hccl_comm_name(group, rank: int) -> str:
    """The name of ``group``'s HCCL communicator as global rank ``rank`` knows it (torch_npu docs 10240: the MC2
    kernels' ``hcom``)."""
    return group._get_backend(torch.device("npu")).get_hccl_comm_name(rank)


# ----------------------------------------------------------------------------------------------------------------
# oneDNN's linear on the CPU
# ----------------------------------------------------------------------------------------------------------------


def onednn_available() -> bool:
    """Whether this torch build has oneDNN and its linear op."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_linear(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(input, weight, bias)`` computed by oneDNN (input [..., in], weight [out, in]; plain weights, nothing
    repacked)."""
    return torch.ops.mkldnn._linear_pointwise(input, weight, bias, "none", [], "")


def foreach_norm(tensors) -> list:
    """The L2 norm of each tensor, on their device (torch.nn.utils.clip_grad_norm_'s own kernel)."""
    return torch._foreach_norm(tensors)


# ----------------------------------------------------------------------------------------------------------------
# megatron-core's import-time torch.compile decorations
# ----------------------------------------------------------------------------------------------------------------

ORIGINAL = "_torchdynamo_orig_callable"  # where torch.compile's wrappers (and ours) keep the function they wrap


def compiled_original(fn: Any) -> Optional[Callable]:
    """The function a ``torch.compile`` wrapper (or ``compile_on_first_call``'s) wraps, or None."""
    return vars(fn).get(ORIGINAL) if callable(fn) and hasattr(fn, "__dict__") else None


def compile_on_first_call(compile_fn: Callable) -> Callable:
    """A stand-in for ``torch.compile`` whose result calls ``compile_fn(fn, **options)`` at its first call (what
    ``torch.compile`` does itself, minus importing the compiler when the decoration is made)."""

    def deferred_compile(model: Any = None, **options: Any) -> Any:
        if model is None:  # the decorator-factory form: @torch.compile(**options)
            return lambda fn: deferred_compile(fn, **options)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = compile_fn(model, **options)
            return compiled(*args, **kwargs)

        setattr(call, ORIGINAL, model)  # as torch.compile's wrappers: the NPU adaptation unwraps by it
        return call

    return deferred_compile


def import_megatron_core() -> None:
    """Import megatron-core with its ``jit_fuser`` (``torch.compile``) decorations deferred to each function's first
    call: ``torch.compile`` is replaced while ``megatron.core.jit`` is imported (which binds it as ``jit_fuser``, read
    by every module that decorates, then and later) and restored at once. Nothing changes once megatron-core is
    imported, nor anywhere else; it cannot be undone (megatron-core's modules keep the stand-in), and it changes when
    compilation is set up, not what runs. The commands call this before their first megatron-core import."""
    if "megatron.core" in sys.modules:
        return
    real = torch.compile
    torch.compile = compile_on_first_call(real)
    try:
        import megatron.core  # noqa: F401 - the package imports megatron.core.jit and its first decorated modules
    finally:
        torch.compile = real
