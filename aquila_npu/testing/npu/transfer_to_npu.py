"""The fake ``torch_npu.contrib.transfer_to_npu`` (child processes only, after the fake runtime of
``aquila_npu.testing.npu.runtime``): what importing the real module does, for the parts a CPU can imitate."""

from __future__ import annotations

import functools
import sys

import torch

from aquila_npu.compat.torch import redirecting
from aquila_npu.testing.npu import runtime

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


def _wrap_cuda(fn):
    """As transfer_to_npu's wrapper: cuda -> npu in positional arguments (ints too for ``to`` / ``to_empty``), in the
    device keyword arguments (ints become ``npu:<i>``) and in ``device_ids`` (compat's one redirection mechanism)."""
    return redirecting(fn, "cuda", "npu", ints_in_args=getattr(fn, "__name__", "") in ("to", "to_empty"))


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
    if runtime.state["transferred"]:
        return
    npu = torch.npu
    runtime.events.append(("transfer_to_npu", sorted(m for m in sys.modules if m.split(".")[0] == "megatron")))
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
    dist.ProcessGroupNCCL = dist.distributed_c10d.ProcessGroupNCCL = runtime.ProcessGroupHCCL
    _wrap_all(torch.nn.parallel.DistributedDataParallel, ("__init__",))
    torch.jit.script = lambda obj, *args, **kwargs: obj
    torch.jit.script_method = lambda fn: fn
    torch._utils._get_available_device_type = lambda: "npu"
    runtime.state["transferred"] = True
