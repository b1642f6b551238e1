"""The fake torch_npu runtime (child processes only).

``import torch_npu`` resolves here when ``fake_runtime_path()`` is first on PYTHONPATH (a loader package of a few
lines delegating to ``install_runtime`` / ``transfer_to_npu``). It gives the emulated ops
(``aquila_npu.testing.npu.ops``) plus what the real package does on import: the device type "npu" (torch's privateuse1
backend renamed), ``torch.npu``, legacy ``torch.npu.*Tensor`` types, ``Tensor.npu`` / ``Module.npu`` /
``Tensor.is_npu`` and the ``hccl`` process-group backend. There is no NPU: "npu" is an alias of the CPU (one memory,
every tensor is a CPU tensor), hccl is gloo, the NPU generator is the CPU generator. What it proves: the API calls,
their order and the numerics; never speed.

Strict where the real runtime would fail or misbehave on an Atlas node:
* the hccl backend refuses to start before ``torch.npu.set_device`` (each rank must own its device before HCCL
  creates its communicator; otherwise every rank would bind to device 0);
* ``set_device`` refuses an index >= ``device_count()``.
Not caught, since host and device memory are one here: a CPU tensor given to an HCCL collective or an NPU kernel
(works here, fails on hardware), host-device copies and their cost.
The runtime is irreversible (torch allows one privateuse1 name per process): never install it in the pytest process.

It imitates torch_npu, whose job is to change torch: its changes are torch_npu's, made as the real package makes
them (tests/test_npu_runtime.py compares its lists with the wheel), not aquila_npu's (those live in
``aquila_npu.compat``); where it redirects device arguments it uses compat's one mechanism.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import sys
import types

import torch
from torch import Tensor

from aquila_npu.compat.torch import HostEvent, HostStream, device_constructors, redirect_device_arguments
from aquila_npu.testing.npu import ops

FAKE_DEVICE_NAME = "fake NPU (aquila_npu.testing.npu on the CPU)"
# A torch_npu release pairs with the torch of its version number: the fake is built on the installed torch, so it
# is that pair (its APIs are torch_npu 2.13.0's), marked as not the real one.
FAKE_VERSION = torch.__version__.split("+")[0] + "+aquila.emulated"
DEVICES_ENV = "AQUILA_FAKE_NPU_DEVICES"  # how many NPUs the fake node has (default 8, an Atlas 800T A2)
REPORT_ENV = "AQUILA_FAKE_NPU_REPORT"  # a folder: each process writes <folder>/rank<RANK>-<pid>.json at exit

# What the runtime saw, in order: ("import",), ("set_device", idx), ("hccl", rank, size, device), ("transfer_to_npu",
# [megatron modules already imported]). Tests read it from the report.
events: list = []
state = {"installed": False, "initialized": False, "device": None, "queued": [], "transferred": False}


def fake_runtime_path() -> str:
    """The folder to put first on a child process's PYTHONPATH so that ``import torch_npu`` is this fake."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_torch_npu")


def _is_npu(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "npu"
    return isinstance(device, str) and (device == "npu" or device.startswith("npu:"))


def _device_index(device) -> int:
    if device is None or (isinstance(device, str) and device == "npu"):
        return state["device"] if state["device"] is not None else 0
    if isinstance(device, int):
        return device
    if isinstance(device, str):
        device = torch.device(device)
    if isinstance(device, torch.device):
        if device.type != "npu":
            raise ValueError(f"Expected an npu device, but got: {device}")
        return device.index if device.index is not None else _device_index(None)
    raise ValueError(f"Invalid device {device!r}")


# ---------------------------------------------------------------------------------------------- torch.npu namespace
def is_available() -> bool:
    return True


def device_count() -> int:
    return int(os.environ.get(DEVICES_ENV, "8"))


def is_initialized() -> bool:
    return state["initialized"]


def _lazy_init() -> None:
    if state["initialized"]:
        return
    state["initialized"] = True
    queued, state["queued"] = state["queued"], []
    for cb in queued:
        cb()


def init() -> None:
    _lazy_init()


def _lazy_call(cb) -> None:
    """As torch_npu: run now when initialised, else when the NPU initialises (first set_device / device use)."""
    if state["initialized"]:
        cb()
    else:
        state["queued"].append(cb)


def set_device(device) -> None:
    idx = _device_index(device)
    if idx < 0:
        return
    if idx >= device_count():
        raise RuntimeError(f"set_device({device!r}): this node has {device_count()} NPUs "
                           f"(device ids 0..{device_count() - 1})")
    state["device"] = idx
    events.append(("set_device", idx))
    _lazy_init()


def current_device() -> int:
    _lazy_init()
    return state["device"] if state["device"] is not None else 0


class device:
    """Context manager selecting an NPU (as ``torch.npu.device``)."""

    def __init__(self, device):
        self.idx = -1 if device is None or (isinstance(device, int) and device < 0) else _device_index(device)
        self.prev = -1

    def __enter__(self):
        if self.idx >= 0:
            self.prev = current_device()
            state["device"] = self.idx

    def __exit__(self, *exc):
        if self.idx >= 0:
            state["device"] = self.prev
        return False


def is_current_stream_capturing() -> bool:
    """No NPU graph is ever captured here. torch's optimizers ask ``torch.cuda.is_current_stream_capturing()`` before a
    step whenever a CUDA build of torch sees a device (``torch.cuda.is_available()``, the NPU's under transfer_to_npu),
    and transfer_to_npu points the name at torch_npu's: without it a CUDA build of torch on a machine without a CUDA
    driver (as in CI) would ask the driver."""
    return False


def synchronize(device=None) -> None:
    _lazy_init()


def get_device_name(device_name=None) -> str:
    return FAKE_DEVICE_NAME


def get_device_properties(device_name=None):
    return types.SimpleNamespace(name=FAKE_DEVICE_NAME, total_memory=0, cube_core_num=0, vector_core_num=0)


def get_device_capability(device=None):
    """As torch_npu 2.13.0 (npu/__init__.py:565-622): None unless TORCH_NPU_DEVICE_CAPABILITY is 'major.minor'. (torch's
    own ``dist.broadcast`` indexes the result for tensors that are ``is_cuda``, which transfer_to_npu makes npu
    tensors: without the variable it fails with "'NoneType' object is not subscriptable", on the real runtime too.)"""
    value = os.environ.get("TORCH_NPU_DEVICE_CAPABILITY", "")
    major, dot, minor = value.partition(".")
    return (int(major), int(minor)) if dot and major.isdigit() and minor.isdigit() else None


def is_bf16_supported(including_emulation: bool = False) -> bool:
    return True


def mem_get_info(device=None):
    return (0, 0)


def utilization(device=None) -> int:
    return 0


def _zero(device=None) -> int:
    return 0


memory_allocated = max_memory_allocated = memory_reserved = max_memory_reserved = _zero
memory_cached = max_memory_cached = _zero


def memory_stats(device=None) -> dict:
    return {}


def _nothing(device=None) -> None:
    return None


reset_peak_memory_stats = reset_max_memory_allocated = reset_max_memory_cached = _nothing
reset_accumulated_memory_stats = _nothing


def empty_cache() -> None:
    pass


def set_per_process_memory_fraction(fraction, device=None) -> None:
    pass


def memory_summary(device=None, abbreviated: bool = False) -> str:
    return f"{FAKE_DEVICE_NAME}: no device memory (tensors live in host memory)"


# RNG: the fake NPU's generator is the CPU generator (every "npu" tensor is a CPU tensor, so dropout & co. draw from it)
def _generator(device=None):
    _device_index(device)
    return torch.default_generator


def get_rng_state(device="npu") -> Tensor:
    _lazy_init()
    return _generator(device).get_state()


def set_rng_state(new_state: Tensor, device="npu") -> None:
    state = new_state.clone()
    _lazy_call(lambda: _generator(device).set_state(state))


def get_rng_state_all():
    return [get_rng_state(i) for i in range(device_count())]


def set_rng_state_all(new_states) -> None:
    for i, state in enumerate(new_states):
        set_rng_state(state, i)


def manual_seed(seed) -> None:
    # never torch.manual_seed here: it calls torch.cuda.manual_seed_all, which transfer_to_npu points at this module
    seed = int(seed)
    _lazy_call(lambda: torch.default_generator.manual_seed(seed))


manual_seed_all = manual_seed


def seed() -> None:
    _lazy_call(torch.default_generator.seed)


seed_all = seed


def initial_seed() -> int:
    _lazy_init()
    return torch.default_generator.initial_seed()


Event, Stream = HostEvent, HostStream  # work runs at once on the host: no device queue to wait for


_streams = {}


def current_stream(device=None) -> Stream:
    return _streams.setdefault(_device_index(device), Stream())


default_stream = current_stream


@contextlib.contextmanager
def stream(stream):
    yield


def set_stream(stream) -> None:
    pass


class _LegacyType(type):
    """``torch.npu.FloatTensor`` & co.: a tensor is an instance when its dtype matches (all fake NPU tensors are CPU
    tensors); calling one builds a tensor of that dtype, as the CPU legacy constructors do."""

    def __instancecheck__(cls, obj):
        return isinstance(obj, torch.Tensor) and obj.dtype == cls.dtype

    def __call__(cls, *args, **kwargs):
        return cls.host(*args, **kwargs)


_LEGACY = {"Float": torch.float32, "Half": torch.float16, "BFloat16": torch.bfloat16, "Double": torch.float64,
           "Long": torch.int64, "Int": torch.int32, "Short": torch.int16, "Char": torch.int8, "Byte": torch.uint8,
           "Bool": torch.bool}
_LEGACY_BY_DTYPE = {dtype: kind for kind, dtype in _LEGACY.items()}
for _kind, _dtype in _LEGACY.items():
    globals()[f"{_kind}Tensor"] = _LegacyType(f"{_kind}Tensor", (), {
        "dtype": _dtype, "host": getattr(torch, f"{_kind}Tensor"), "__module__": "torch_npu.npu"})


NPU_API = ("is_available", "device_count", "is_initialized", "init", "set_device", "current_device", "device",
           "synchronize", "get_device_name", "get_device_properties", "get_device_capability", "is_bf16_supported",
           "mem_get_info", "utilization", "memory_allocated", "max_memory_allocated", "memory_reserved",
           "max_memory_reserved", "memory_cached", "max_memory_cached", "memory_stats", "memory_summary",
           "empty_cache", "reset_peak_memory_stats", "reset_max_memory_allocated", "reset_max_memory_cached",
           "reset_accumulated_memory_stats", "set_per_process_memory_fraction", "get_rng_state", "set_rng_state",
           "get_rng_state_all", "set_rng_state_all", "manual_seed", "manual_seed_all", "seed", "seed_all",
           "initial_seed", "Event", "Stream", "current_stream", "default_stream", "stream", "set_stream",
           "is_current_stream_capturing", "set_compile_mode", *(f"{kind}Tensor" for kind in _LEGACY))
"""The public names of ``torch_npu.npu`` the fake provides (each exists in the real ``torch_npu.npu.__all__``: a test
checks it against the wheel)."""


def _npu_module() -> types.ModuleType:
    npu = types.ModuleType("torch_npu.npu")
    npu.__doc__ = "The fake runtime's torch.npu (aquila_npu.testing.npu.runtime)."
    for name in NPU_API:
        setattr(npu, name, globals()[name])
    npu.__all__ = list(NPU_API)
    npu._lazy_call, npu._lazy_init = _lazy_call, _lazy_init
    npu._is_in_bad_fork = lambda: False  # torch.manual_seed seeds a custom device through these two
    # one generator per device, all of them the CPU's (as above); torch_npu fills this at initialisation
    npu.default_generators = (torch.default_generator,) * device_count()
    npu.random = npu.memory = npu  # torch_npu.npu.random / .memory: the same functions
    return npu


# -------------------------------------------------------------------------- "npu" as an alias of the CPU, on import
def _factory_names():
    """torch's own list of functions that take ``device=`` (what its DeviceContext intercepts), plus ``*_like``, and
    ``torch.load`` (its ``map_location``)."""
    return device_constructors() + ["load"]


def _npu_type_name(self, *args, **kwargs):
    """``Tensor.type()``: NPU tensors are named ``torch.npu.<T>Tensor`` (inferred from torch_npu's
    ``torch.npu.FloatTensor`` types and MindSpeed's npu->cuda rewrite of the name; not observed on hardware). In the
    fake every tensor is an NPU tensor. With an argument: the conversion, npu type names meaning the CPU ones."""
    if args or kwargs:
        target = args[0] if args else kwargs.pop("dtype")
        if isinstance(target, str):
            target = target.replace("torch.npu.", "torch.")
        elif isinstance(target, _LegacyType):
            target = target.host
        return _host_type(self, target, *args[1:], **kwargs)
    return f"torch.npu.{_LEGACY_BY_DTYPE[self.dtype]}Tensor" if self.dtype in _LEGACY_BY_DTYPE else _host_type(self)


_host_type = torch.Tensor.type  # replaced by the original at install time


def _alias_npu_to_cpu() -> None:
    global _host_type
    _host_type = torch.Tensor.type
    tensor, module = torch.Tensor, torch.nn.Module
    for owner, names in ((torch, _factory_names()), (module, ("to", "to_empty")),
                         (tensor, ("new_empty", "new_empty_strided", "new_full", "new_ones", "new_tensor", "new_zeros",
                                   "to"))):
        # npu devices in device= / map_location= and positional arguments go to the CPU; never undone (one
        # privateuse1 backend per process); bare ints are not npu devices without transfer_to_npu
        redirect_device_arguments(owner, names, "npu", "cpu", ints_in_kwargs=False, journaled=False)
    tensor.npu = lambda self, device=None, non_blocking=False, memory_format=None: self
    tensor.is_npu = property(lambda self: True)
    module.npu = lambda self, device=None: self
    tensor.type = _npu_type_name


# ------------------------------------------------------------------------------------------ hccl on top of gloo
class ProcessGroupHCCL(torch.distributed.ProcessGroupGloo):
    """The ``hccl`` backend: gloo underneath. (torch hands back the C++ gloo object from ``group._get_backend``, so
    the one HCCL method our code calls lives on ``_HcclBackendView``.)"""


class _HcclBackendView:
    """What ``group._get_backend(torch.device("npu"))`` returns in the fake: the gloo backend plus HCCL's
    ``get_hccl_comm_name``, whose name the emulated MC2 kernels resolve back to the group (its c10d name)."""

    def __init__(self, group, backend):
        self._group, self._backend = group, backend

    def get_hccl_comm_name(self, rank: int, init_comm: bool = True) -> str:
        from torch.distributed import distributed_c10d as c10d

        return c10d._world.pg_names[self._group]

    def __getattr__(self, name):
        return getattr(self._backend, name)


def _npu_backend_views(get_backend):
    @functools.wraps(get_backend)
    def _get_backend(self, device):
        backend = get_backend(self, device)
        return _HcclBackendView(self, backend) if _is_npu(device) else backend

    return _get_backend


def _create_hccl(store, rank, size, timeout):
    if state["device"] is None:
        raise RuntimeError("hccl: torch.npu.set_device(local_rank) must come before init_process_group('hccl') "
                           "(HCCL binds each rank's communicator to its current device)")
    events.append(("hccl", rank, size, state["device"]))
    settings["at_hccl"].append(_runtime_env())
    return ProcessGroupHCCL(store, rank, size, timeout)


def _is_hccl_available() -> bool:
    return True


# ------------------------------------------------------------------------------------------- runtime settings
# What CANN, HCCL and torch_npu read from the environment (aquila_npu/device/npu_runtime.py sets them): the fake
# records their values where the real ones read them, when torch_npu is imported (the allocator's configuration,
# CPU affinity) and when an HCCL communicator starts (HCCL's timeouts and ports).
RUNTIME_ENV = ("HCCL_CONNECT_TIMEOUT", "HCCL_EXEC_TIMEOUT", "HCCL_IF_BASE_PORT", "PYTORCH_NPU_ALLOC_CONF",
               "CPU_AFFINITY_CONF")


# their values at import and at each communicator's start, and each set_compile_mode(jit_compile) (kept apart from
# ``events``, whose order the tests check)
settings: dict = {"at_import": None, "at_hccl": [], "compile_mode": []}


def _runtime_env() -> dict:
    return {name: os.environ.get(name) for name in RUNTIME_ENV}


def set_compile_mode(jit_compile=False) -> None:
    """torch_npu's operator compile mode (False: CANN's binary kernels); recorded."""
    settings["compile_mode"].append(bool(jit_compile))


# ------------------------------------------------------------------------------------------------------- report
def report() -> dict:
    """What this process's fake runtime saw (JSON-able): its events in order and the emulated op calls."""
    mod = sys.modules.get("torch_npu")
    return {"pid": os.getpid(), "rank": os.environ.get("RANK"), "events": [list(e) for e in events],
            "calls": dict(getattr(mod, "calls", {})), "settings": settings}


def _write_report() -> None:
    folder = os.environ.get(REPORT_ENV)
    if folder:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"rank{os.environ.get('RANK', '0')}-{os.getpid()}.json"), "w") as f:
            json.dump(report(), f)


def _register_no_device_memory_hooks() -> None:
    """Newer torch asks the privateuse1 backend's C++ hooks which accelerator the machine has (torch 2.13's
    dist.barrier does, and fails without hooks): the fake has no device memory, so they answer "none" and torch's
    accelerator stays the CPU, where the tensors are. (Older torch has no Python hooks and does not ask.)"""
    acc = getattr(torch._C, "_acc", None)
    if acc is None or not hasattr(acc, "register_python_privateuseone_hook"):
        return

    class NoDeviceMemory(acc.PrivateUse1Hooks):
        def is_available(self) -> bool:
            return False

        def has_primary_context(self, device_index) -> bool:
            return False

        def is_built(self) -> bool:
            return True

    state["hooks"] = NoDeviceMemory()  # kept alive: torch holds a pointer to it
    acc.register_python_privateuseone_hook(state["hooks"])


def install_runtime(mod: types.ModuleType) -> types.ModuleType:
    """Make ``mod`` (the loader package's ``torch_npu``) the fake torch_npu, as ``import torch_npu`` does for the real
    one. Once per process."""
    if state["installed"]:
        return mod
    emulated = ops.module()
    for name in ops.EMULATED_OPS:
        setattr(mod, name, getattr(emulated, name))
    mod.calls = emulated.calls
    mod.__version__ = FAKE_VERSION
    mod.__aquila_emulator__ = True
    torch.utils.rename_privateuse1_backend("npu")
    _register_no_device_memory_hooks()
    npu = _npu_module()
    torch._register_device_module("npu", npu)
    mod.npu = npu
    sys.modules["torch_npu.npu"] = npu
    _alias_npu_to_cpu()
    torch.distributed.Backend.register_backend("hccl", _create_hccl, devices=["cpu", "npu"])
    torch.distributed.ProcessGroup._get_backend = _npu_backend_views(torch.distributed.ProcessGroup._get_backend)
    torch.distributed.is_hccl_available = _is_hccl_available
    mod.ProcessGroupHCCL = ProcessGroupHCCL
    state["installed"] = True
    events.append(("import",))
    settings["at_import"] = _runtime_env()
    atexit.register(_write_report)
    return mod
