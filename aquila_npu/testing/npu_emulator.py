"""A stand-in ``torch_npu`` for tests on machines without an Ascend NPU.

It implements only the ops aquila_npu calls, in plain torch, with the real signatures (argument names and defaults as
in torch_npu 2.13.0's ``op_plugin/meta/_meta_registrations.py``), layouts, mask conventions and return values.
Results prove API use and numerics, never speed.

    with npu_emulator.installed():
        ...  # import torch_npu gives this module

Only the paths we use are emulated; anything else raises NotImplementedError rather than guessing.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib.machinery
import math
import sys
import types

import torch
import torch.nn.functional as F
from torch import Tensor

EMULATED_OPS = ("npu_rms_norm", "npu_fusion_attention", "npu_rotary_mul", "npu_swiglu", "npu_apply_adam_w")


def npu_rms_norm(self: Tensor, gamma: Tensor, epsilon: float = 1e-6):
    """Returns ``(y, rstd)``: y = x * rstd * gamma (computed in fp32, cast to x's dtype); rstd is fp32 and keeps
    the leading dims of x that gamma does not cover (size 1 elsewhere)."""
    x = self.float()
    dims = tuple(range(self.dim() - gamma.dim(), self.dim()))
    rstd = torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    y = (x * rstd * gamma.float()).to(self.dtype)
    return y, rstd


def npu_swiglu(x: Tensor, dim: int = -1) -> Tensor:
    """silu(first half) * second half along ``dim`` (fp32 math, output in x's dtype)."""
    a, b = x.float().chunk(2, dim=dim)
    return (F.silu(a) * b).to(x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_interleave(x: Tensor) -> Tensor:
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def npu_rotary_mul(embedding: Tensor, cosine: Tensor, sine: Tensor, mode: str = "half", rotate=None) -> Tensor:
    """x * cos + rotate(x) * sin for 4-D x; cos/sin broadcast to x. mode 'half' (rotate-half, as LLaMA/Aquila)
    or 'interleave'."""
    if embedding.dim() != 4:
        raise RuntimeError(f"npu_rotary_mul expects a 4-D input, got {embedding.dim()}-D")
    if rotate is not None:
        raise NotImplementedError("npu_rotary_mul(rotate=...) is not emulated")
    rot = {"half": _rotate_half, "interleave": _rotate_interleave}.get(mode)
    if rot is None:
        raise NotImplementedError(f"npu_rotary_mul mode {mode!r} is not emulated")
    x = embedding.float()
    return (x * cosine.float() + rot(x) * sine.float()).to(embedding.dtype)


def _to_bnsd(t: Tensor, layout: str, heads: int = 0) -> Tensor:
    if layout == "BNSD":
        return t
    if layout == "BSND":
        return t.transpose(1, 2)
    if layout in ("SBH", "BSH"):
        if layout == "SBH":
            t = t.transpose(0, 1)  # [B, S, H]
        b, s, h = t.shape
        return t.reshape(b, s, heads, h // heads).transpose(1, 2)
    raise NotImplementedError(f"input_layout {layout!r} is not emulated")


def _from_bnsd(t: Tensor, layout: str) -> Tensor:
    if layout == "BNSD":
        return t
    if layout == "BSND":
        return t.transpose(1, 2)
    b, n, s, d = t.shape
    t = t.transpose(1, 2).reshape(b, s, n * d)
    return t.transpose(0, 1) if layout == "SBH" else t


def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                         scale=1.0, keep_prob=1.0, pre_tockens=2147483647, next_tockens=2147483647, inner_precise=0,
                         prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                         gen_mask_parallel=True, sync=False, softmax_layout="", sink=None, dropout_mask=None, seed=0,
                         offset=0):
    """Softmax(scale * q k^T, masked) v with torch_npu's conventions.

    Layouts BSH / SBH / BSND / BNSD. GQA: key/value may have fewer heads than ``head_num`` (Nq / Nkv integer).
    ``atten_mask``: bool/uint8, True = masked, shape SS, 11SS, B1SS or BNSS. With ``sparse_mode=0`` and a mask, the
    token window applies too (top-left origin): query i may see key j when ``i - pre_tockens <= j <= i +
    next_tockens``. Returns the 7 outputs: (attention_out, softmax_max [B,N,S1,8], softmax_sum [B,N,S1,8],
    softmax_out (empty), seed, offset, numels).
    """
    if sparse_mode != 0:
        raise NotImplementedError("only sparse_mode=0 is emulated")
    if pse is not None or padding_mask is not None or prefix is not None or actual_seq_qlen is not None \
            or actual_seq_kvlen is not None or sink is not None:
        raise NotImplementedError("pse / padding_mask / prefix / varlen / sink are not emulated")
    q = _to_bnsd(query, input_layout, head_num)
    d = q.shape[-1]
    if input_layout in ("SBH", "BSH"):
        kv_heads = key.shape[-1] // d
        k, v = _to_bnsd(key, input_layout, kv_heads), _to_bnsd(value, input_layout, kv_heads)
    else:
        k, v = _to_bnsd(key, input_layout), _to_bnsd(value, input_layout)
    n, nkv = q.shape[1], k.shape[1]
    if n != head_num or n % nkv:
        raise RuntimeError(f"head_num {head_num} must equal query heads ({n}) and be a multiple of kv heads ({nkv})")
    qf, kf, vf = q.float(), k.float(), v.float()
    if nkv != n:
        kf = kf.repeat_interleave(n // nkv, dim=1)
        vf = vf.repeat_interleave(n // nkv, dim=1)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [B, N, S1, S2]
    s1, s2 = scores.shape[-2:]
    if atten_mask is not None:
        masked = atten_mask.bool()
        i = torch.arange(s1, device=scores.device).unsqueeze(1)
        j = torch.arange(s2, device=scores.device).unsqueeze(0)
        masked = masked | (j > i + next_tockens) | (j < i - pre_tockens)
        scores = scores.masked_fill(masked, float("-inf"))
    smax = scores.amax(dim=-1, keepdim=True)
    smax = torch.where(torch.isfinite(smax), smax, torch.zeros_like(smax))
    e = torch.exp(scores - smax)
    ssum = e.sum(dim=-1, keepdim=True)
    probs = e / ssum.clamp_min(torch.finfo(torch.float32).tiny)
    if keep_prob < 1.0:
        probs = F.dropout(probs, p=1.0 - keep_prob, training=True)
    out = torch.matmul(probs, vf).to(query.dtype)
    b = q.shape[0]
    softmax_max = smax.expand(b, n, s1, 8).contiguous()
    softmax_sum = ssum.expand(b, n, s1, 8).contiguous()
    return (_from_bnsd(out, input_layout), softmax_max, softmax_sum, query.new_empty(0), 0, 0, 0)


def npu_apply_adam_w(beta1_power, beta2_power, lr, weight_decay, beta1, beta2, epsilon, grad, max_grad_norm, amsgrad,
                     maximize, *, out):
    """AdamW step in place on ``out = (var, m, v)``; ``beta*_power`` are beta**(step-1) as MindSpeed passes them."""
    if amsgrad or max_grad_norm is not None:
        raise NotImplementedError("amsgrad / max_grad_norm are not emulated")
    var, m, v = out
    g = -grad if maximize else grad
    with torch.no_grad():
        var.mul_(1 - lr * weight_decay)
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bc1 = 1 - beta1_power * beta1
        bc2 = 1 - beta2_power * beta2
        denom = (v.sqrt() / math.sqrt(bc2)).add_(epsilon)
        var.addcdiv_(m, denom, value=-lr / bc1)
    return var, m, v


def _module() -> types.ModuleType:
    mod = types.ModuleType("torch_npu")
    mod.__doc__ = __doc__
    # A spec, so that libraries probing find_spec("torch_npu") (accelerate, transformers) get an answer; they then
    # find no torch.npu device and stay on their CPU paths.
    mod.__spec__ = importlib.machinery.ModuleSpec("torch_npu", loader=None)
    mod.__aquila_emulator__ = True
    mod.calls = collections.Counter()  # op name -> number of calls, so tests can see the fused path ran

    def counted(name):
        fn = globals()[name]

        @functools.wraps(fn)
        def op(*args, **kwargs):
            mod.calls[name] += 1
            return fn(*args, **kwargs)

        return op

    for name in EMULATED_OPS:
        setattr(mod, name, counted(name))
    return mod


@contextlib.contextmanager
def installed():
    """Make ``import torch_npu`` return the emulator inside the block."""
    saved = sys.modules.get("torch_npu")
    sys.modules["torch_npu"] = _module()
    try:
        yield sys.modules["torch_npu"]
    finally:
        if saved is None:
            sys.modules.pop("torch_npu", None)
        else:
            sys.modules["torch_npu"] = saved


# =================================================================================================================
# The fake torch_npu runtime (child processes only)
# =================================================================================================================
#
# ``import torch_npu`` resolves here when ``fake_runtime_path()`` is first on PYTHONPATH (a loader package of a few
# lines delegating to ``install_runtime`` / ``transfer_to_npu``). It gives the ops above plus what the real package
# does on import: the device type "npu" (torch's privateuse1 backend renamed), ``torch.npu``, legacy
# ``torch.npu.*Tensor`` types, ``Tensor.npu`` / ``Module.npu`` / ``Tensor.is_npu`` and the ``hccl`` process-group
# backend. There is no NPU: "npu" is an alias of the CPU (one memory, every tensor is a CPU tensor), hccl is gloo, the
# NPU generator is the CPU generator. What it proves: the API calls, their order and the numerics; never speed.
#
# Strict where the real runtime would fail or misbehave on an Atlas node:
# * the hccl backend refuses to start before ``torch.npu.set_device`` (each rank must own its device before HCCL
#   creates its communicator; otherwise every rank would bind to device 0);
# * ``set_device`` refuses an index >= ``device_count()``.
# Not caught, since host and device memory are one here: a CPU tensor given to an HCCL collective or an NPU kernel
# (works here, fails on hardware), host-device copies and their cost.
# The runtime is irreversible (torch allows one privateuse1 name per process): never install it in the pytest process.

import atexit
import json
import os

from aquila_npu.device.patches import HostEvent, HostStream

FAKE_DEVICE_NAME = "fake NPU (aquila_npu.testing.npu_emulator on the CPU)"
FAKE_VERSION = "2.13.0+aquila.emulated"  # the torch_npu release whose APIs this imitates, marked as not the real one
DEVICES_ENV = "AQUILA_FAKE_NPU_DEVICES"  # how many NPUs the fake node has (default 8, an Atlas 800T A2)
REPORT_ENV = "AQUILA_FAKE_NPU_REPORT"  # a folder: each process writes <folder>/rank<RANK>-<pid>.json at exit

# What the runtime saw, in order: ("import",), ("set_device", idx), ("hccl", rank, size, device), ("transfer_to_npu",
# [megatron modules already imported]). Tests read it from the report.
events: list = []
_state = {"installed": False, "initialized": False, "device": None, "queued": [], "transferred": False}


def fake_runtime_path() -> str:
    """The folder to put first on a child process's PYTHONPATH so that ``import torch_npu`` is this fake."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_torch_npu")


def _is_npu(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "npu"
    return isinstance(device, str) and (device == "npu" or device.startswith("npu:"))


def _host(device):
    """An NPU device (``'npu'``, ``'npu:3'``, ``torch.device('npu', 3)``) -> the CPU, where the fake keeps tensors."""
    if _is_npu(device):
        return torch.device("cpu")
    if isinstance(device, dict):  # torch.load's map_location
        return {k: ("cpu" if _is_npu(v) else v) for k, v in device.items()}
    return device


def _device_index(device) -> int:
    if device is None or (isinstance(device, str) and device == "npu"):
        return _state["device"] if _state["device"] is not None else 0
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
    return _state["initialized"]


def _lazy_init() -> None:
    if _state["initialized"]:
        return
    _state["initialized"] = True
    queued, _state["queued"] = _state["queued"], []
    for cb in queued:
        cb()


def init() -> None:
    _lazy_init()


def _lazy_call(cb) -> None:
    """As torch_npu: run now when initialised, else when the NPU initialises (first set_device / device use)."""
    if _state["initialized"]:
        cb()
    else:
        _state["queued"].append(cb)


def set_device(device) -> None:
    idx = _device_index(device)
    if idx < 0:
        return
    if idx >= device_count():
        raise RuntimeError(f"set_device({device!r}): this node has {device_count()} NPUs "
                           f"(device ids 0..{device_count() - 1})")
    _state["device"] = idx
    events.append(("set_device", idx))
    _lazy_init()


def current_device() -> int:
    _lazy_init()
    return _state["device"] if _state["device"] is not None else 0


class device:
    """Context manager selecting an NPU (as ``torch.npu.device``)."""

    def __init__(self, device):
        self.idx = -1 if device is None or (isinstance(device, int) and device < 0) else _device_index(device)
        self.prev = -1

    def __enter__(self):
        if self.idx >= 0:
            self.prev = current_device()
            _state["device"] = self.idx

    def __exit__(self, *exc):
        if self.idx >= 0:
            _state["device"] = self.prev
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
           *(f"{kind}Tensor" for kind in _LEGACY))
"""The public names of ``torch_npu.npu`` the fake provides (each exists in the real ``torch_npu.npu.__all__``: a test
checks it against the wheel)."""


def _npu_module() -> types.ModuleType:
    npu = types.ModuleType("torch_npu.npu")
    npu.__doc__ = "The fake runtime's torch.npu (aquila_npu.testing.npu_emulator)."
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
def _rewrite_device_kwargs(fn, *, positional: bool = False):
    """``fn`` with npu devices in ``device=`` / ``map_location=`` (and, for ``to``, the first positional argument)
    sent to the CPU."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if positional and args:
            args = (args[0], _host(args[1])) + args[2:] if len(args) > 1 else args
        for key in ("device", "map_location"):
            if key in kwargs:
                kwargs[key] = _host(kwargs[key])
        return fn(*args, **kwargs)

    return wrapper


def _factory_names():
    """torch's own list of functions that take ``device=`` (what its DeviceContext intercepts), plus ``*_like``."""
    from torch.utils._device import _device_constructors

    names = {fn.__name__ for fn in _device_constructors() if getattr(torch, fn.__name__, None) is fn}
    names |= {n for n in dir(torch) if n.endswith("_like") and callable(getattr(torch, n))}
    return sorted(names | {"load"})


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
    for name in _factory_names():
        setattr(torch, name, _rewrite_device_kwargs(getattr(torch, name)))
    tensor, module = torch.Tensor, torch.nn.Module
    for name in ("new_empty", "new_empty_strided", "new_full", "new_ones", "new_tensor", "new_zeros"):
        setattr(tensor, name, _rewrite_device_kwargs(getattr(tensor, name)))
    tensor.to = _rewrite_device_kwargs(tensor.to, positional=True)
    module.to = _rewrite_device_kwargs(module.to, positional=True)
    module.to_empty = _rewrite_device_kwargs(module.to_empty)
    tensor.npu = lambda self, device=None, non_blocking=False, memory_format=None: self
    tensor.is_npu = property(lambda self: True)
    module.npu = lambda self, device=None: self
    tensor.type = _npu_type_name


# ------------------------------------------------------------------------------------------ hccl on top of gloo
class ProcessGroupHCCL(torch.distributed.ProcessGroupGloo):
    """The ``hccl`` backend: gloo underneath, plus the one HCCL method our code may call (MC2 kernels take the
    communicator's name)."""

    def get_hccl_comm_name(self, rank: int, init_comm: bool = True) -> str:
        return f"fake-hccl-{id(self):x}"


def _create_hccl(store, rank, size, timeout):
    if _state["device"] is None:
        raise RuntimeError("hccl: torch.npu.set_device(local_rank) must come before init_process_group('hccl') "
                           "(HCCL binds each rank's communicator to its current device)")
    events.append(("hccl", rank, size, _state["device"]))
    return ProcessGroupHCCL(store, rank, size, timeout)


def _is_hccl_available() -> bool:
    return True


# ------------------------------------------------------------------------------------------------------- report
def report() -> dict:
    """What this process's fake runtime saw (JSON-able): its events in order and the emulated op calls."""
    mod = sys.modules.get("torch_npu")
    return {"pid": os.getpid(), "rank": os.environ.get("RANK"), "events": [list(e) for e in events],
            "calls": dict(getattr(mod, "calls", {}))}


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

    _state["hooks"] = NoDeviceMemory()  # kept alive: torch holds a pointer to it
    acc.register_python_privateuseone_hook(_state["hooks"])


def install_runtime(mod: types.ModuleType) -> types.ModuleType:
    """Make ``mod`` (the loader package's ``torch_npu``) the fake torch_npu, as ``import torch_npu`` does for the real
    one. Once per process."""
    if _state["installed"]:
        return mod
    ops = _module()
    for name in EMULATED_OPS:
        setattr(mod, name, getattr(ops, name))
    mod.calls = ops.calls
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
    torch.distributed.is_hccl_available = _is_hccl_available
    mod.ProcessGroupHCCL = ProcessGroupHCCL
    _state["installed"] = True
    events.append(("import",))
    atexit.register(_write_report)
    return mod


# ------------------------------------------------------------------------------ torch_npu.contrib.transfer_to_npu
# The white lists of torch_npu 2.13.0's contrib/transfer_to_npu.py (lines 30-50), which this fake mirrors: the
# functions whose device arguments it rewrites from cuda to npu. A test compares them with the wheel's file.
TORCH_FN_WHITE_LIST = (
    'logspace', 'randint', 'hann_window', 'rand', 'full_like', 'ones_like', 'rand_like', 'randperm', 'arange',
    'frombuffer', 'normal', '_empty_per_channel_affine_quantized', 'empty_strided', 'empty_like', 'scalar_tensor',
    'tril_indices', 'bartlett_window', 'ones', 'sparse_coo_tensor', 'randn', 'kaiser_window', 'tensor',
    'triu_indices', 'as_tensor', 'zeros', 'randint_like', 'full', 'eye', '_sparse_csr_tensor_unsafe', 'empty',
    '_sparse_coo_tensor_unsafe', 'blackman_window', 'zeros_like', 'range', 'sparse_csr_tensor', 'randn_like',
    'from_file', '_cudnn_init_dropout_state', '_empty_affine_quantized', 'linspace', 'hamming_window',
    'empty_quantized', '_pin_memory', 'load', 'set_default_device', 'get_device_module', 'sparse_compressed_tensor')
TORCH_TENSOR_FN_WHITE_LIST = ('new_empty', 'new_empty_strided', 'new_full', 'new_ones', 'new_tensor', 'new_zeros',
                              'to', 'pin_memory')
TORCH_MODULE_FN_WHITE_LIST = ('to', 'to_empty')
TORCH_CUDA_FN_WHITE_LIST = (
    'get_device_properties', 'get_device_name', 'get_device_capability', 'list_gpu_processes', 'set_device',
    'synchronize', 'mem_get_info', 'memory_stats', 'memory_summary', 'memory_allocated', 'max_memory_allocated',
    'reset_max_memory_allocated', 'memory_reserved', 'max_memory_reserved', 'reset_max_memory_cached',
    'reset_peak_memory_stats', 'default_stream', 'can_device_access_peer', 'current_stream', 'utilization',
    'set_per_process_memory_fraction', 'caching_allocator_alloc', 'get_rng_state', 'set_rng_state')
DEVICE_KWARGS_LIST = ('device', 'device_type', 'map_location', 'device_id')


def _cuda_to_npu(value, replace_int: bool):
    if isinstance(value, str) and "cuda" in value:
        return value.replace("cuda", "npu")
    if isinstance(value, torch.device) and value.type == "cuda":
        return torch.device("npu", value.index) if value.index is not None else torch.device("npu")
    if replace_int and isinstance(value, int) and not isinstance(value, bool):
        return f"npu:{value}"
    if isinstance(value, dict):
        return {(k.replace("cuda", "npu") if isinstance(k, str) else k):
                (v.replace("cuda", "npu") if isinstance(v, str) else v) for k, v in value.items()}
    return value


def _wrap_cuda(fn):
    """As transfer_to_npu's wrapper: cuda -> npu in positional arguments (ints too for ``to`` / ``to_empty``), in the
    device keyword arguments (ints become ``npu:<i>``) and in ``device_ids``."""
    replace_int = getattr(fn, "__name__", "") in ("to", "to_empty")

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args = tuple(_cuda_to_npu(a, replace_int) for a in args)
        for key in DEVICE_KWARGS_LIST:
            if kwargs.get(key) is not None:
                kwargs[key] = _cuda_to_npu(kwargs[key], True)
        if isinstance(kwargs.get("device_ids"), (list, tuple)):
            ids = kwargs["device_ids"]
            kwargs["device_ids"] = type(ids)(_cuda_to_npu(d, replace_int) for d in ids)
        return fn(*args, **kwargs)

    return wrapper


def _wrap_hccl(fn):
    """As transfer_to_npu's wrapper: 'nccl' -> 'hccl' (and cuda -> npu) in string arguments and ``backend=``."""

    def swap(value):
        return value.replace("nccl", "hccl").replace("cuda", "npu") if type(value) is str else value

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args = tuple(swap(a) for a in args)
        if "backend" in kwargs:
            kwargs["backend"] = swap(kwargs["backend"])
        return fn(*args, **kwargs)

    return wrapper


def _wrap_all(owner, names) -> None:
    for name in names:
        fn = getattr(owner, name, None)
        if fn is not None:
            setattr(owner, name, _wrap_cuda(fn))


def transfer_to_npu() -> None:
    """What importing ``torch_npu.contrib.transfer_to_npu`` does (torch_npu 2.13.0, ``_init()``), for the parts a
    CPU can imitate: ``torch.cuda.*`` becomes ``torch.npu.*``; device arguments naming cuda name npu (the white lists
    above; ``Tensor.cuda`` / ``Module.cuda`` / ``is_cuda``); the nccl backend becomes hccl in ``init_process_group``
    and new groups; ``torch.cuda.default_generators`` becomes the NPU's once the NPU initialises;
    ``torch.jit.script`` becomes a pass-through. Left out (no CPU meaning here, or unused by aquila_npu): profiler,
    inductor/triton, FSDP, device mesh, pipelining, autocast, storages, the ``torch.Generator`` / ``torch.Event``
    proxies and the library wrappers of its apis_config.json. Once per process."""
    if _state["transferred"]:
        return
    npu = torch.npu
    events.append(("transfer_to_npu", sorted(m for m in sys.modules if m.split(".")[0] == "megatron")))
    for name in npu.__all__:  # as torch_npu's _apply_patches(['cuda', torch_npu.npu], ...)
        setattr(torch.cuda, name, getattr(npu, name))
    _wrap_all(torch.cuda, TORCH_CUDA_FN_WHITE_LIST)
    torch.cuda.device.__init__ = _wrap_cuda(torch.cuda.device.__init__)

    def update_default_generators():
        torch.cuda.default_generators = npu.default_generators

    npu._lazy_call(update_default_generators)
    _wrap_all(torch.cuda.random, ("get_rng_state", "set_rng_state"))
    _wrap_all(torch, TORCH_FN_WHITE_LIST)
    _wrap_all(torch.Tensor, TORCH_TENSOR_FN_WHITE_LIST)
    torch.Tensor.cuda = torch.Tensor.npu
    torch.Tensor.is_cuda = torch.Tensor.is_npu
    torch.cuda.DoubleTensor = npu.FloatTensor
    _wrap_all(torch.nn.Module, TORCH_MODULE_FN_WHITE_LIST)
    torch.nn.Module.cuda = torch.nn.Module.npu
    dist = torch.distributed
    dist.init_process_group = _wrap_hccl(_wrap_cuda(dist.init_process_group))
    dist.is_nccl_available = dist.is_hccl_available
    dist.ProcessGroup._get_backend = _wrap_cuda(dist.ProcessGroup._get_backend)
    dist.distributed_c10d._new_group_with_tag = _wrap_hccl(dist.distributed_c10d._new_group_with_tag)
    dist.Backend.default_device_backend_map.pop("cuda", None)
    dist.ProcessGroupNCCL = dist.distributed_c10d.ProcessGroupNCCL = ProcessGroupHCCL
    _wrap_all(torch.nn.parallel.DistributedDataParallel, ("__init__",))
    torch.jit.script = lambda obj, *args, **kwargs: obj
    torch.jit.script_method = lambda fn: fn
    torch._utils._get_available_device_type = lambda: "npu"
    _state["transferred"] = True
