"""The one place where aquila_npu changes the behaviour of other libraries.

Nothing here runs on import. The device layer (``aquila_npu.device.setup``) opts in to exactly the patches its
device needs, and every patch is recorded so that ``undo_all()`` restores the original objects (tests use it).

Two groups of patches exist:

* ``redirect_cuda_to_cpu()``: megatron-core assumes CUDA in a few places (``torch.cuda.current_device()`` as a
  device, tensor factories called with ``device='cuda'``, CUDA RNG state helpers, ``param.type() ==
  'torch.cuda.FloatTensor'`` checks in grad clipping and the optimizers). On a plain CPU we send all of them to the
  CPU. On an Ascend NPU the same role is played by ``torch_npu.contrib.transfer_to_npu`` (imported by
  ``aquila_npu.device.setup``), with ``adapt_megatron_to_npu()`` adding what it leaves out.
* ``grad_norm_without_host_syncs()``: without Transformer Engine or Apex, megatron-core's gradient norm falls back
  to ``local_multi_tensor_l2_norm``, which builds ``torch.tensor(list of device scalars)``: one device-to-host copy
  (a sync) per gradient tensor, every step. The replacement computes the same norm on the device.
* ``use_adam(adam)``: megatron-core picks its Adam class when ``megatron.core.optimizer`` is imported (Transformer
  Engine's or Apex's FusedAdam where they import, torch's AdamW otherwise) and offers no argument to choose it. The
  training run chooses the implementation itself (``aquila_npu.training.adam``) and this patch makes megatron-core use
  it.
* ``cpu_inference_linears_on_onednn()``: megatron-core's tensor-parallel linears (the model's four per layer and the
  output layer GPTModel builds itself) compute through autograd functions and torch's BLAS; on the CPU, outside
  autograd, their fp32 products go to oneDNN instead (``aquila_npu.device.onednn``: twice the speed here).
* ``import_megatron_core()``: megatron-core decorates its fusion functions with ``torch.compile`` when its modules
  are imported (``megatron.core.jit.jit_fuser``); each decoration imports torch's compiler stack (dynamo, inductor:
  0.9 s of a 1.8 s import) although compilation only happens at a decorated function's first call. The commands
  import megatron-core through this function, which defers the decoration itself to that first call.
* ``provide_fused_rope(fn)``: megatron-core applies rotary embeddings with its own code, or, for a config with
  ``apply_rope_fusion=True``, with the function in its fused-RoPE slot (Transformer Engine's on CUDA). A backend with
  a fused RoPE kernel (``torch_npu.npu_rotary_mul``) sets ``apply_rope_fusion`` and its function goes into the slot.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import time
from typing import Any, Callable, List, Tuple

import torch

_applied: List[Tuple[Any, str, Any]] = []
_UNSET = object()
_groups: set = set()


def _set(owner: Any, name: str, value: Any) -> None:
    _applied.append((owner, name, getattr(owner, name)))
    setattr(owner, name, value)


def applied() -> set:
    """Names of the patch groups currently installed."""
    return set(_groups)


def _setenv(name: str, value: str) -> None:
    """Set an environment variable the device's runtime reads (unless the user set it), undoably."""
    if name not in os.environ:
        _applied.append((os.environ, name, _UNSET))
        os.environ[name] = value


def undo_all() -> None:
    """Restore every patched attribute (and environment variable), newest first."""
    while _applied:
        owner, name, old = _applied.pop()
        if owner is os.environ:
            os.environ.pop(name, None)
        else:
            setattr(owner, name, old)
    _groups.clear()


# ----------------------------------------------------------------------------------------------------------------
# CPU redirection
# ----------------------------------------------------------------------------------------------------------------

_CPU = torch.device("cpu")


def _to_cpu_device(device: Any) -> Any:
    """Map 'cuda', 'cuda:N', torch.device('cuda', N) to the CPU; leave everything else alone."""
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


def _factory(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return wrapper


class HostEvent:
    """Stand-in for torch.cuda.Event: wall-clock timing on the host (also the fake NPU runtime's Event)."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self._t = None

    def record(self, stream=None):
        self._t = time.perf_counter()

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, end: "HostEvent") -> float:
        return (end._t - self._t) * 1000.0


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


def _report_type_as_cuda(prefix: str) -> None:
    """Make ``tensor.type()`` (no arguments) name ``prefix`` tensors as CUDA ones, for megatron-core's checks."""
    names = {f"{prefix}{kind}Tensor": f"torch.cuda.{kind}Tensor" for kind in ("Float", "Half", "BFloat16")}
    tensor_type = torch.Tensor.type

    def type_(self, *args, **kwargs):
        if args or kwargs:
            return tensor_type(self, *args, **kwargs)
        name = tensor_type(self)
        return names.get(name, name)

    _set(torch.Tensor, "type", type_)


def _rng_state_helpers(get_state: Callable, set_state: Callable) -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    _set(mcore_random, "_get_cuda_rng_state", lambda *a, **k: get_state())
    _set(mcore_random, "_set_cuda_rng_state", lambda state, *a, **k: set_state(state))


def redirect_cuda_to_cpu() -> None:
    """Let megatron-core's CUDA-only code paths run on the CPU (gloo). Idempotent."""
    if "cpu" in _groups:
        return
    cuda = torch.cuda
    _set(cuda, "current_device", lambda: _CPU)
    _set(cuda, "set_device", lambda *a, **k: None)
    _set(cuda, "synchronize", lambda *a, **k: None)
    _set(cuda, "empty_cache", lambda *a, **k: None)
    _set(cuda, "device_count", lambda: 0)
    _set(cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))
    _set(cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state())
    _set(cuda, "set_rng_state", lambda state, device="cuda": torch.set_rng_state(state))
    _set(cuda, "Event", HostEvent)
    _set(cuda, "Stream", HostStream)
    _set(cuda, "current_stream", lambda *a, **k: HostStream())
    _set(cuda, "default_stream", lambda *a, **k: HostStream())
    _set(cuda, "stream", lambda *a, **k: contextlib.nullcontext())
    _set(cuda, "memory_allocated", lambda *a, **k: 0)
    _set(cuda, "max_memory_allocated", lambda *a, **k: 0)
    _set(cuda, "memory_reserved", lambda *a, **k: 0)
    _set(cuda, "max_memory_reserved", lambda *a, **k: 0)

    for name in ("empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint", "as_tensor",
                 "empty_like", "zeros_like", "ones_like", "full_like", "randn_like", "rand_like", "linspace"):
        _set(torch, name, _factory(getattr(torch, name)))

    tensor_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args:
            args = (_to_cpu_device(args[0]),) + args[1:]
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return tensor_to(self, *args, **kwargs)

    _set(torch.Tensor, "to", to)
    _set(torch.Tensor, "cuda", lambda self, *a, **k: self)
    _set(torch.nn.Module, "cuda", lambda self, *a, **k: self)

    _report_type_as_cuda("torch.")
    _rng_state_helpers(torch.get_rng_state, torch.set_rng_state)
    _groups.add("cpu")


def _npu_counterpart(value: Any) -> Any:
    """What a megatron-core module-level object bound at import should be on the NPU, or ``value`` itself:

    * a function or class of ``torch.cuda`` (``from torch.cuda import _lazy_call``): the one ``torch.cuda`` holds now,
      if transfer_to_npu replaced it, else ``torch.npu``'s of the same name (``_lazy_call``, ``_lazy_init``: torch's
      would queue RNG restores until a CUDA initialisation that never comes);
    * a tuple of those (``_FLOAT_TYPES = (torch.FloatTensor, torch.cuda.FloatTensor)``): element-wise;
    * ``partial(..., device_type="cuda")`` (``tensor_parallel.layers.custom_fwd``): with ``device_type="npu"``;
    * a function compiled by megatron-core's ``jit_fuser`` (``torch.compile``): the original function, as MindSpeed
      does (it replaces torch.compile with a pass-through before importing megatron-core).
    """
    if isinstance(value, tuple):
        new = tuple(_npu_counterpart(v) for v in value)
        return new if any(a is not b for a, b in zip(new, value)) else value
    if isinstance(value, functools.partial) and value.keywords.get("device_type") == "cuda":
        return functools.partial(value.func, *value.args, **{**value.keywords, "device_type": "npu"})
    if inspect.isfunction(value) and "_torchdynamo_orig_callable" in vars(value):
        return value._torchdynamo_orig_callable
    if (inspect.isfunction(value) or inspect.isclass(value)) and value.__module__.startswith("torch.cuda"):
        now = getattr(torch.cuda, value.__name__, None)
        if now is not None and now is not value:
            return now
        return getattr(torch.npu, value.__name__, value)
    return value


def _rebind_captured_cuda_symbols() -> None:
    """megatron-core binds torch.cuda objects when its modules are imported (``tensor_parallel.random``'s
    ``_lazy_call`` / ``device``, ``transformer.module``'s ``_FLOAT_TYPES``, ``layers.custom_fwd``, ``jit_fuser``-
    compiled functions). Modules imported before transfer_to_npu keep the CUDA ones: rebind every such module-level
    (and class-level) object in the megatron modules imported so far, and make ``jit_fuser`` a pass-through for the
    modules imported later. The order of imports then does not matter (tests/test_npu_runtime.py checks both)."""
    for name, module in list(sys.modules.items()):
        if module is None or name.split(".")[0] != "megatron":
            continue
        for attr, value in list(vars(module).items()):
            new = _npu_counterpart(value)
            if new is not value:
                _set(module, attr, new)
            elif inspect.isclass(value) and value.__module__ == name:
                for key, member in list(vars(value).items()):
                    wrapped = isinstance(member, (staticmethod, classmethod))
                    fn = member.__func__ if wrapped else member
                    if inspect.isfunction(fn) and "_torchdynamo_orig_callable" in vars(fn):
                        orig = fn._torchdynamo_orig_callable
                        _set(value, key, type(member)(orig) if wrapped else orig)
    jit = sys.modules.get("megatron.core.jit")
    if jit is not None:
        _set(jit, "jit_fuser", jit.noop_decorator)


def adapt_megatron_to_npu() -> None:
    """What ``torch_npu.contrib.transfer_to_npu`` leaves to us: megatron-core's CUDA type-name checks, its private
    CUDA RNG-state helpers and the torch.cuda objects its modules bound at import. Call after importing
    transfer_to_npu."""
    if "npu" in _groups:
        return
    _report_type_as_cuda("torch.npu.")
    _rng_state_helpers(lambda: torch.npu.get_rng_state(), lambda s: torch.npu.set_rng_state(s))
    _rebind_captured_cuda_symbols()
    # torch's dist.broadcast reads torch.cuda.get_device_capability(t)[0] for is_cuda tensors, which npu tensors are
    # under transfer_to_npu; torch_npu answers None unless this variable names one (its docs: "only for
    # compatibility with PyTorch"). 8.0: no sm90 fp8 path (fp8 broadcasts go as bytes); bf16 supported.
    _setenv("TORCH_NPU_DEVICE_CAPABILITY", "8.0")
    _groups.add("npu")


# ----------------------------------------------------------------------------------------------------------------
# Gradient norm without a host sync per tensor
# ----------------------------------------------------------------------------------------------------------------


def l2_norm_on_device(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """megatron-core's ``local_multi_tensor_l2_norm`` (same arguments and result: a [1] fp32 tensor holding the L2 norm
    of all the tensors of ``tensor_lists``, and None) without leaving the device: the per-tensor norms are stacked
    on the device instead of being read one by one into ``torch.tensor(list)``. Same numbers on the CPU
    (tests/test_training_speed.py). Written here because megatron-core's only sync-free versions are Apex's and
    Transformer Engine's CUDA kernels."""
    tensors = [t for tensor_list in tensor_lists for t in tensor_list]
    if not tensors:
        return torch.zeros(1, dtype=torch.float, device=noop_flag.device), None
    norms = torch._foreach_norm(tensors)  # torch.nn.utils.clip_grad_norm_'s own per-tensor norms
    return torch.linalg.vector_norm(torch.stack(norms)).float().reshape(1), None


def grad_norm_without_host_syncs() -> None:
    """Replace megatron-core's fallback gradient-norm kernel (used when neither Transformer Engine nor Apex is
    installed) by ``l2_norm_on_device``. A real multi-tensor kernel (TE / Apex) is left alone. Idempotent."""
    if "grad-norm" in _groups:
        return
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads

    if clip_grads.l2_norm_impl is mcore_utils.local_multi_tensor_l2_norm:
        _set(clip_grads, "l2_norm_impl", l2_norm_on_device)
        _groups.add("grad-norm")


# ----------------------------------------------------------------------------------------------------------------
# The optimizer
# ----------------------------------------------------------------------------------------------------------------


def use_adam(adam: Callable) -> None:
    """Make ``megatron.core.optimizer.get_megatron_optimizer`` build its Adam with ``adam`` (called as megatron-core
    calls Apex's or TE's FusedAdam: ``params, lr, weight_decay, betas, eps, adam_w_mode``; it must return a
    ``torch.optim.Adam`` or ``AdamW``) instead of the class it picked at import.

    Two modules of megatron-core 0.16.1 made that choice at import, and both read it at call time: the builder
    (``optimizer/__init__.py``: ``Adam``, ``USING_PYTORCH_OPTIMIZER``) and the distributed optimizer, whose
    ``state_dict`` / ``load_state_dict`` keep Adam's ``step`` in each parameter's state for torch's optimizers but in
    the param groups for Apex's / TE's (``HAVE_APEX_OR_TE``, ``USING_APEX_OPTIMIZER``, ``USING_TE_OPTIMIZER``). Both
    are told the truth: a torch optimizer."""
    from megatron.core import optimizer as mcore_optimizer
    from megatron.core.optimizer import distrib_optimizer

    if "adam" in _groups and mcore_optimizer.Adam is adam:
        return
    _set(mcore_optimizer, "Adam", adam)
    _set(mcore_optimizer, "USING_PYTORCH_OPTIMIZER", False)  # False: megatron-core calls ``Adam``, not torch's class
    _set(distrib_optimizer, "Adam", torch.optim.Adam)  # its isinstance check accepts (Adam, torch.optim.AdamW)
    _set(distrib_optimizer, "HAVE_APEX_OR_TE", False)
    _set(distrib_optimizer, "USING_APEX_OPTIMIZER", False)
    _set(distrib_optimizer, "USING_TE_OPTIMIZER", False)
    _groups.add("adam")


# ----------------------------------------------------------------------------------------------------------------
# Fused RoPE
# ----------------------------------------------------------------------------------------------------------------


def provide_fused_rope(fn: Callable) -> None:
    """Put ``fn(t, freqs)`` into megatron-core's fused-RoPE slot (``rope_utils.fused_apply_rotary_pos_emb``, filled by
    Transformer Engine where it is installed). megatron-core uses the slot for every config with
    ``apply_rope_fusion=True``, which the backend that chose ``fn`` sets (``config_overrides``)."""
    if "rope" in _groups:
        return
    from megatron.core.models.common.embeddings import rope_utils

    def fused_apply_rotary_pos_emb(t, freqs, interleaved: bool = False, **unused):
        if interleaved:
            raise NotImplementedError("the fused RoPE kernel here is rotate-half (Aquila2's); interleaved RoPE is not "
                                      "supported")
        return fn(t, freqs)

    _set(rope_utils, "fused_apply_rotary_pos_emb", fused_apply_rotary_pos_emb)
    _groups.add("rope")


# ----------------------------------------------------------------------------------------------------------------
# CPU inference linears
# ----------------------------------------------------------------------------------------------------------------


def _onednn_forward_impl(original: Callable) -> Callable:
    from aquila_npu.device import onednn

    @functools.wraps(original)
    def _forward_impl(self, input, weight, *args, **kwargs):
        # megatron-core passes every argument by keyword; the input is gathered inside the original only with
        # sequence parallelism, which this route leaves to it.
        if not args and not kwargs.get("sequence_parallel") and onednn.takes(input, weight):
            return onednn.linear(input, weight, kwargs.get("bias"))
        return original(self, input, weight, *args, **kwargs)

    return _forward_impl


def cpu_inference_linears_on_onednn() -> None:
    """Route the fp32 products of megatron-core's ``ColumnParallelLinear`` / ``RowParallelLinear`` that run outside
    autograd on the CPU to oneDNN (``aquila_npu.device.onednn``); with autograd, on other devices, in other dtypes
    and with sequence parallelism they run megatron-core's own code. Their ``_forward_impl`` is the seam (the method
    both classes call for the matrix product, after their own tensor-parallel input handling and before the output
    gather / reduce); the output layer GPTModel builds itself is a ``ColumnParallelLinear`` too, so one patch serves
    every linear of the model. Idempotent; nothing happens where torch has no oneDNN."""
    from aquila_npu.device import onednn
    from megatron.core.tensor_parallel import layers

    if "onednn-linear" in _groups or not onednn.available():
        return
    for cls in (layers.ColumnParallelLinear, layers.RowParallelLinear):
        _set(cls, "_forward_impl", _onednn_forward_impl(cls._forward_impl))
    _groups.add("onednn-linear")


# ----------------------------------------------------------------------------------------------------------------
# megatron-core's import-time torch.compile decorations
# ----------------------------------------------------------------------------------------------------------------


def _compile_on_first_call(compile_fn: Callable) -> Callable:
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

        # torch.compile's own wrappers carry the original the same way; adapt_megatron_to_npu unwraps by it.
        call._torchdynamo_orig_callable = model
        return call

    return deferred_compile


def import_megatron_core() -> None:
    """Import megatron-core with its ``jit_fuser`` (``torch.compile``) decorations deferred to each function's first
    call: ``torch.compile`` is replaced while ``megatron.core.jit`` is imported (which binds it as ``jit_fuser``,
    read by every module that decorates, then and later) and restored at once. Nothing changes once megatron-core
    is imported, nor anywhere else. The commands call this before their first megatron-core import."""
    if "megatron.core" in sys.modules:
        return
    real = torch.compile
    torch.compile = _compile_on_first_call(real)
    try:
        import megatron.core  # noqa: F401 - the package imports megatron.core.jit and its first decorated modules
    finally:
        torch.compile = real
