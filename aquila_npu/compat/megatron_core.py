"""megatron-core: what aquila_npu replaces in it, overrides or calls that is not its public API (``RECORDS``).

Installers (each idempotent, journaled, called by the device layer or training, never on import):

* ``redirect_cuda_to_cpu()``: torch.cuda answered by the host (``compat.torch``) plus megatron-core's private CUDA
  RNG-state helpers on the CPU generator.
* ``adapt_to_npu()``: after torch_npu's ``transfer_to_npu``: the type-name and RNG-state adapters, and the torch.cuda
  objects megatron-core's modules bound when they were imported (``tensor_parallel.random``'s ``_lazy_call`` /
  ``device``, ``transformer.module``'s ``_FLOAT_TYPES``, ``layers.custom_fwd``, ``jit_fuser``-compiled functions).
* ``grad_norm_without_host_syncs()``: the fallback gradient-norm kernel without one host sync per tensor.
* ``use_adam(adam)``: megatron-core builds the optimizer class training chose (``aquila_npu.training.adam``).
* ``provide_fused_rope(fn)``: a fused RoPE kernel in megatron-core's fused-RoPE slot.
* ``cpu_inference_linears_on_onednn()``: CPU fp32 products outside autograd on oneDNN.
* ``optimizer_step_without_host_syncs()``: the optimizers' gradient norm and clipping on the device (--no-step-syncs).

Pieces other modules build on (so that they need no private name themselves):

* ``LinearProductSeam``: a mixin for megatron-core's tensor-parallel linears whose matrix product is ours (MC2).
* ``RotatedKeyCache``: a mixin for megatron-core's ``SelfAttention`` whose keys enter the static KV cache rotated.
* ``HiddenStateLoss``: a mixin for megatron-core's ``GPTModel`` whose training loss is computed from the hidden states.
* ``DatasetConfigKeys``: a mixin for a ``MegatronDataset`` whose config has more fields that name its cache.
* ``build_datasets(builder)``: megatron-core's dataset builder, also without a process group.
* ``load_distributed_optimizer_state(optimizer, state)``: a resume that neither shares nor mutates what it must not.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from typing import Any, Callable

import torch

from aquila_npu.compat import journal
from aquila_npu.compat import torch as compat_torch
from aquila_npu.compat.record import Replacement

MCORE = "megatron-core 0.16.1"
RANDOM = "megatron.core.tensor_parallel.random"

RECORDS = (
    Replacement(f"{RANDOM}:_get_cuda_rng_state", "replaced",
                "megatron-core's RNG tracker reads the CUDA generator through it: the CPU's (or torch.npu's) instead",
                MCORE, "tests/test_pretrain.py", "(device='cuda', clone=False, graph_safe=False)"),
    Replacement(f"{RANDOM}:_set_cuda_rng_state", "replaced", "as _get_cuda_rng_state, for restoring", MCORE,
                "tests/test_pretrain.py", "(new_state, device=-1, graph_safe=False)"),
    Replacement(f"{RANDOM}:_lazy_call", "bound",
                "bound from torch.cuda when megatron-core is imported; torch's queues RNG restores until a CUDA "
                "initialisation that never comes on an NPU: torch.npu's", MCORE,
                "tests/test_npu_runtime.py::test_captured_cuda_symbols_are_replaced_whatever_the_import_order"),
    Replacement("megatron.core.transformer.module:_FLOAT_TYPES", "bound",
                "(torch.FloatTensor, torch.cuda.FloatTensor) bound at import: the NPU's types after transfer_to_npu",
                MCORE, "tests/test_npu_runtime.py::test_captured_cuda_symbols_are_replaced_whatever_the_import_order"),
    Replacement("megatron.core.jit:jit_fuser", "replaced",
                "torch.compile on an NPU compiles for CUDA: functions it decorated are unwrapped to the original (as "
                "MindSpeed does) and later decorations pass through", MCORE,
                "tests/test_npu_runtime.py::test_captured_cuda_symbols_are_replaced_whatever_the_import_order"),
    Replacement("megatron.core.optimizer.clip_grads:l2_norm_impl", "replaced",
                "without Transformer Engine or Apex it is local_multi_tensor_l2_norm, which copies one scalar per "
                "gradient tensor to the host (a sync each): l2_norm_on_device gives the same norm on the device",
                MCORE, "tests/test_training_speed.py"),
    Replacement("megatron.core.utils:local_multi_tensor_l2_norm", "replaced",
                "the function l2_norm_on_device stands in for (same arguments and result)", MCORE,
                "tests/test_training_speed.py", "(chunk_size, noop_flag, tensor_lists, per_tensor, *args)"),
    Replacement("megatron.core.optimizer:Adam", "replaced",
                "megatron-core picks its Adam at import (TE's, else Apex's FusedAdam, else torch's AdamW) with no "
                "argument to choose; an Apex without its CUDA extensions imports and then fails in FusedAdam's "
                "constructor. Training chooses torch's AdamW for the device (aquila_npu.training.adam)", MCORE,
                "tests/test_optimizer.py"),
    Replacement("megatron.core.optimizer:USING_PYTORCH_OPTIMIZER", "replaced",
                "False, so that get_megatron_optimizer calls the Adam given, not torch's class", MCORE,
                "tests/test_optimizer.py"),
    Replacement("megatron.core.optimizer.distrib_optimizer:HAVE_APEX_OR_TE", "replaced",
                "the distributed optimizer keeps Adam's step per parameter for torch's optimizers and in the param "
                "groups for Apex's / TE's: told the truth, a torch optimizer (with USING_APEX_OPTIMIZER, "
                "USING_TE_OPTIMIZER and Adam)", MCORE, "tests/test_optimizer.py"),
    Replacement("megatron.core.models.common.embeddings.rope_utils:fused_apply_rotary_pos_emb", "replaced",
                "megatron-core's fused-RoPE slot (Transformer Engine's on CUDA), used for apply_rope_fusion=True: an "
                "NPU backend's npu_rotary_mul goes there", MCORE, "tests/test_backends.py"),
    Replacement("megatron.core.models.common.embeddings.rope_utils:fused_apply_rotary_pos_emb_thd", "replaced",
                "the same slot for packed documents (thd): the NPU kernel with each document's positions restarting",
                MCORE, "tests/test_packing.py"),
    Replacement("megatron.core.tensor_parallel.layers:ColumnParallelLinear._forward_impl", "wrapped",
                "the one method both tensor-parallel linears (and GPTModel's output layer) call for the matrix "
                "product: on the CPU, fp32 products outside autograd go to oneDNN; the MC2 linears override it "
                "(LinearProductSeam)", MCORE, "tests/test_onednn.py", "(self, input, weight, *args, **kwargs)"),
    Replacement("megatron.core.tensor_parallel.layers:RowParallelLinear._forward_impl", "wrapped",
                "as ColumnParallelLinear._forward_impl", MCORE, "tests/test_onednn.py",
                "(self, input, weight, *args, **kwargs)"),
    Replacement("megatron.core.transformer.attention:Attention._adjust_key_value_for_inference", "overridden",
                "the static-batch KV cache stores keys unrotated and megatron-core rotates the whole cache again at "
                "every decoding step: RotatedKeyCache stores them rotated (127 -> 73 ms per step after a 900-token "
                "prompt)", MCORE, "tests/test_kv_cache_rope.py",
                "(self, inference_context, query, key, value, rotary_pos_emb, rotary_pos_cos=None, "
                "rotary_pos_sin=None, rotary_pos_cos_sin=None, sequence_len_offset=None, *, inference_params=None)"),
    Replacement("megatron.core.transformer.attention:_yarn_get_concentration_factor_from_config", "called",
                "the mscale megatron-core's forward applies with the rotary embedding, applied the same way to "
                "the keys RotatedKeyCache rotates", MCORE, "tests/test_kv_cache_rope.py", "(config)"),
    Replacement("megatron.core.transformer.attention:apply_rotary_pos_emb", "called",
                "megatron-core's own rotation, for the keys entering the cache (public in rope_utils, used through "
                "attention's binding so that a fused slot applies too)", MCORE, "tests/test_kv_cache_rope.py",
                "(t, freqs, config, cu_seqlens=None, mscale=1.0, cp_group=None)"),
    Replacement("megatron.core.datasets.megatron_dataset:MegatronDataset._key_config_attributes", "overridden",
                "the config fields that name a dataset's cached index: an instruction dataset adds its own "
                "(DatasetConfigKeys)", MCORE, "tests/test_datasets.py", "()"),
    Replacement("megatron.core.datasets.blended_dataset:torch.distributed.get_rank", "replaced",
                "only while build_datasets runs without a process group: BlendedDataset calls get_rank() unguarded "
                "when it writes its index cache, which raises in one process without torch.distributed", MCORE,
                "tests/test_datasets.py"),
    Replacement("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.load_state_dict", "called",
                "without Apex / TE it gives every parameter's Adam state one shared 'step' tensor, which each update "
                "then increments (a resume drifts after one iteration): load_distributed_optimizer_state un-shares it",
                MCORE, "tests/test_pretrain.py", "(self, state_dict)"),
    Replacement("megatron.core.optimizer.distrib_optimizer:"
                "DistributedOptimizer.load_parameter_state_from_dp_reshardable", "called",
                "copies into the main params without no_grad: for fp32 parameters (LoRA adapters, fp32 training) they "
                "are views of leaves that require grad and autograd refuses; called under torch.no_grad()", MCORE,
                "tests/test_lora_training.py", "(self, state_dict)"),
    Replacement("megatron.core.optimizer.optimizer:get_grad_norm_fp32", "bound",
                "returns the gradient norm as a Python float (.item(): a host sync inside every optimizer step); "
                "with --no-step-syncs the optimizers' binding is grad_norm_fp32_on_device (a device tensor, the same "
                "L2 norm); any other norm type or DTensor gradients go to megatron-core's", MCORE,
                "tests/test_step_switches.py", "(grads_for_norm, norm_type=2, grad_stats_parallel_group=None)"),
    Replacement("megatron.core.optimizer.optimizer:clip_grad_by_total_norm_fp32", "bound",
                "'if clip_coeff < 1.0' on the norm reads it on the host: with --no-step-syncs clip_grads_on_device "
                "multiplies by min(1, max_norm / (norm + 1e-6)) on the device (by 1.0, unchanged, when not clipping)",
                MCORE, "tests/test_step_switches.py", "(parameters, max_norm, total_norm, use_decoupled_grad=False)"),
    Replacement("megatron.core.models.gpt.gpt_model:GPTModel._postprocess", "overridden",
                "the training loss from the final hidden states in one call (HiddenStateLoss: the output layer and "
                "the cross-entropy in chunks, --loss-chunk-size); GPTModel has no public seam between the output "
                "layer and compute_language_model_loss, and the logits are what the chunks avoid holding", MCORE,
                "tests/test_step_switches.py",
                "(self, hidden_states, input_ids, position_ids, labels, rotary_pos_emb, rotary_pos_cos, "
                "rotary_pos_sin, mtp_in_postprocess=None, loss_mask=None, decoder_input=None, attention_mask=None, "
                "inference_params=None, packed_seq_params=None, sequence_len_offset=None, "
                "runtime_gather_output=None, extra_block_kwargs=None, inference_context=None)"),
)

# ----------------------------------------------------------------------------------------------------------------
# Off CUDA: the CPU and the NPU
# ----------------------------------------------------------------------------------------------------------------


def _rng_state_helpers(get_state: Callable, set_state: Callable) -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    journal.set_attr(mcore_random, "_get_cuda_rng_state", lambda *a, **k: get_state())
    journal.set_attr(mcore_random, "_set_cuda_rng_state", lambda state, *a, **k: set_state(state))


def redirect_cuda_to_cpu() -> None:
    """Let megatron-core's CUDA-only code paths run on the CPU (gloo). Idempotent."""
    if journal.done("cpu"):
        return
    compat_torch.redirect_cuda_to_cpu()
    _rng_state_helpers(torch.get_rng_state, torch.set_rng_state)


def npu_counterpart(value: Any) -> Any:
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
        new = tuple(npu_counterpart(v) for v in value)
        return new if any(a is not b for a, b in zip(new, value)) else value
    if isinstance(value, functools.partial) and value.keywords.get("device_type") == "cuda":
        return functools.partial(value.func, *value.args, **{**value.keywords, "device_type": "npu"})
    original = compat_torch.compiled_original(value) if inspect.isfunction(value) else None
    if original is not None:
        return original
    if (inspect.isfunction(value) or inspect.isclass(value)) and value.__module__.startswith("torch.cuda"):
        now = getattr(torch.cuda, value.__name__, None)
        if now is not None and now is not value:
            return now
        return getattr(torch.npu, value.__name__, value)
    return value


def _rebind_captured_cuda_symbols() -> None:
    """Rebind every module-level (and class-level) torch.cuda object of the megatron modules imported so far, and make
    ``jit_fuser`` a pass-through for the modules imported later. The order of imports then does not matter (our
    commands import megatron-core before the device is chosen; tests/test_npu_runtime.py checks both orders)."""
    for name, module in list(sys.modules.items()):
        if module is None or name.split(".")[0] != "megatron":
            continue
        for attr, value in list(vars(module).items()):
            new = npu_counterpart(value)
            if new is not value:
                journal.set_attr(module, attr, new)
            elif inspect.isclass(value) and value.__module__ == name:
                for key, member in list(vars(value).items()):
                    wrapped = isinstance(member, (staticmethod, classmethod))
                    fn = member.__func__ if wrapped else member
                    original = compat_torch.compiled_original(fn) if inspect.isfunction(fn) else None
                    if original is not None:
                        journal.set_attr(value, key, type(member)(original) if wrapped else original)
    jit = sys.modules.get("megatron.core.jit")
    if jit is not None:
        journal.set_attr(jit, "jit_fuser", jit.noop_decorator)


def adapt_to_npu() -> None:
    """What ``torch_npu.contrib.transfer_to_npu`` leaves to us: megatron-core's CUDA type-name checks, its private CUDA
    RNG-state helpers and the torch.cuda objects its modules bound at import. Call after importing transfer_to_npu
    (``compat.torch.import_torch_npu``)."""
    if journal.done("npu"):
        return
    compat_torch.report_type_as_cuda("torch.npu.")
    _rng_state_helpers(lambda: torch.npu.get_rng_state(), lambda s: torch.npu.set_rng_state(s))
    _rebind_captured_cuda_symbols()
    journal.mark("npu")


# ----------------------------------------------------------------------------------------------------------------
# Gradient norm without a host sync per tensor
# ----------------------------------------------------------------------------------------------------------------


def l2_norm_on_device(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """megatron-core's ``local_multi_tensor_l2_norm`` (same arguments and result: a [1] fp32 tensor holding the L2 norm
    of all the tensors of ``tensor_lists``, and None) without leaving the device: the per-tensor norms are stacked
    on the device instead of being read one by one into ``torch.tensor(list)``. Written here because megatron-core's
    only sync-free versions are Apex's and Transformer Engine's CUDA kernels."""
    tensors = [t for tensor_list in tensor_lists for t in tensor_list]
    if not tensors:
        return torch.zeros(1, dtype=torch.float, device=noop_flag.device), None
    norms = compat_torch.foreach_norm(tensors)
    return torch.linalg.vector_norm(torch.stack(norms)).float().reshape(1), None


def grad_norm_without_host_syncs() -> None:
    """Replace megatron-core's fallback gradient-norm kernel (used when neither Transformer Engine nor Apex is
    installed) by ``l2_norm_on_device``. A real multi-tensor kernel (TE / Apex) is left alone. Idempotent."""
    if journal.done("grad-norm"):
        return
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads

    if clip_grads.l2_norm_impl is mcore_utils.local_multi_tensor_l2_norm:
        journal.set_attr(clip_grads, "l2_norm_impl", l2_norm_on_device)
        journal.mark("grad-norm")


# ----------------------------------------------------------------------------------------------------------------
# The optimizer class
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

    if journal.done("adam") and mcore_optimizer.Adam is adam:
        return
    journal.set_attr(mcore_optimizer, "Adam", adam)
    journal.set_attr(mcore_optimizer, "USING_PYTORCH_OPTIMIZER", False)  # False: megatron-core calls ``Adam``
    journal.set_attr(distrib_optimizer, "Adam", torch.optim.Adam)  # its isinstance check takes (Adam, AdamW)
    journal.set_attr(distrib_optimizer, "HAVE_APEX_OR_TE", False)
    journal.set_attr(distrib_optimizer, "USING_APEX_OPTIMIZER", False)
    journal.set_attr(distrib_optimizer, "USING_TE_OPTIMIZER", False)
    journal.mark("adam")


def load_distributed_optimizer_state(optimizer, state) -> None:
    """``optimizer.load_parameter_state_from_dp_reshardable(state)`` for one ``DistributedOptimizer`` (after its
    ``load_state_dict``), without megatron-core 0.16.1's two faults: the Adam ``step`` shared by every parameter
    (un-shared here; the saved per-parameter steps are copied in next), and the in-place copy into main params that are
    views of fp32 leaves requiring grad (loading state is no computation: under no_grad)."""
    for st in optimizer.optimizer.state.values():
        if isinstance(st.get("step"), torch.Tensor):
            st["step"] = st["step"].clone()
    with torch.no_grad():
        optimizer.load_parameter_state_from_dp_reshardable(state)


# ----------------------------------------------------------------------------------------------------------------
# Fused RoPE
# ----------------------------------------------------------------------------------------------------------------


def provide_fused_rope(fn: Callable) -> None:
    """Put ``fn(t, freqs)`` into megatron-core's fused-RoPE slot (``rope_utils.fused_apply_rotary_pos_emb``, filled by
    Transformer Engine where it is installed). megatron-core uses the slot for every config with
    ``apply_rope_fusion=True``, which the backend that chose ``fn`` sets (``config_overrides``)."""
    if journal.done("rope"):
        return
    from megatron.core.models.common.embeddings import rope_utils

    def fused_apply_rotary_pos_emb(t, freqs, interleaved: bool = False, **unused):
        if interleaved:
            raise NotImplementedError("the fused RoPE kernel here is rotate-half (Aquila2's); interleaved RoPE is not "
                                      "supported")
        return fn(t, freqs)

    def fused_apply_rotary_pos_emb_thd(t, cu_seqlens, freqs, cp_size: int = 1, cp_rank: int = 0, **unused):
        # packed documents ([t, h, d], megatron-core's thd): each document's positions restart at 0, as megatron-core's
        # own thd rotation (its case of freqs shorter than the pack)
        if cp_size != 1:
            raise NotImplementedError("the fused RoPE kernel here takes no context parallelism")
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        positions = torch.cat([torch.arange(n, device=freqs.device) for n in lengths])
        return fn(t.unsqueeze(1), freqs[positions]).squeeze(1)

    journal.set_attr(rope_utils, "fused_apply_rotary_pos_emb", fused_apply_rotary_pos_emb)
    journal.set_attr(rope_utils, "fused_apply_rotary_pos_emb_thd", fused_apply_rotary_pos_emb_thd)
    journal.mark("rope")


# ----------------------------------------------------------------------------------------------------------------
# The tensor-parallel linears' product
# ----------------------------------------------------------------------------------------------------------------

PRODUCT_SEAM = "_forward_impl"  # megatron-core's linears compute their matrix product in this method


class LinearProductSeam:
    """Mixin for a subclass of megatron-core's ``ColumnParallelLinear`` / ``RowParallelLinear`` (listed before it)
    whose matrix product is its own: ``linear_product(original, input, weight, *args, **kwargs)``, where
    ``original`` computes megatron-core's and the arguments are megatron-core's (``bias``, ``sequence_parallel``, ...
    by keyword)."""

    def linear_product(self, original, input, weight, *args, **kwargs):
        return original(input, weight, *args, **kwargs)

    def _forward_impl(self, input, weight, *args, **kwargs):
        return self.linear_product(super()._forward_impl, input, weight, *args, **kwargs)


def _onednn_forward_impl(original: Callable) -> Callable:
    @functools.wraps(original)
    def _forward_impl(self, input, weight, *args, **kwargs):
        # megatron-core passes every argument by keyword; the input is gathered inside the original only with
        # sequence parallelism, which this route leaves to it.
        if not args and not kwargs.get("sequence_parallel") and takes_onednn(input, weight):
            return compat_torch.onednn_linear(input, weight, kwargs.get("bias"))
        return original(self, input, weight, *args, **kwargs)

    return _forward_impl


def takes_onednn(input: torch.Tensor, weight: torch.Tensor) -> bool:
    """fp32 CPU tensors outside autograd."""
    return (not torch.is_grad_enabled() and weight.dtype == torch.float32 and input.dtype == torch.float32
            and weight.device.type == "cpu" and input.device.type == "cpu" and weight.dim() == 2)


def cpu_inference_linears_on_onednn() -> None:
    """Route the fp32 products of megatron-core's ``ColumnParallelLinear`` / ``RowParallelLinear`` that run outside
    autograd on the CPU to oneDNN (``compat.torch.onednn_linear``: 2-2.9x MKL's sgemm on our AMD machines); with
    autograd, on other devices, in other dtypes and with sequence parallelism they run megatron-core's own code. The
    product seam is the method both classes call after their own tensor-parallel input handling and before the output
    gather / reduce; the output layer GPTModel builds itself is a ``ColumnParallelLinear`` too, so one patch serves
    every linear of the model. Training is untouched. Idempotent; nothing happens where torch has no oneDNN."""
    from megatron.core.tensor_parallel import layers

    if journal.done("onednn-linear") or not compat_torch.onednn_available():
        return
    for cls in (layers.ColumnParallelLinear, layers.RowParallelLinear):
        journal.set_attr(cls, PRODUCT_SEAM, _onednn_forward_impl(getattr(cls, PRODUCT_SEAM)))
    journal.mark("onednn-linear")


# ----------------------------------------------------------------------------------------------------------------
# Keys rotated once as they enter the static KV cache
# ----------------------------------------------------------------------------------------------------------------


class RotatedKeyCache:
    """Mixin for megatron-core's ``SelfAttention`` (listed before it): keys enter the static-batch KV cache already
    rotated.

    megatron-core 0.16.1's static-batch KV cache (``StaticInferenceContext``, what ``GPTInferenceWrapper`` generates
    with) stores keys before the rotary embedding and, at every decoding step, rotates the whole cache again: in each
    layer the keys of all positions so far go through RoPE's multiplications, ``cat`` and additions, although only one
    position is new. Its alternatives do not fit: ``flash_decode`` needs the CUDA flash-attn package, the dynamic
    context flash-attn >= 2.7.3. Here each key is rotated once, when it enters the cache, with megatron-core's own
    function and the same cos/sin of its position, so the cache holds exactly what megatron-core would compute again
    at every step (element-wise operations: bit for bit the same attention inputs). Only the static-batch inference
    path changes; training and every other path run megatron-core's code."""

    def _adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb,
                                        rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                                        sequence_len_offset=None, **kwargs):
        from megatron.core.transformer import attention as mcore_attention

        # `any(e is None ...)`, not `None in rotary_pos_emb`: that compares tensors with None (20 us, every layer)
        plain = (inference_context is None or not inference_context.is_static_batching() or self.config.flash_decode
                 or not isinstance(rotary_pos_emb, tuple) or any(e is None for e in rotary_pos_emb))
        if plain:
            return super()._adjust_key_value_for_inference(inference_context, query, key, value, rotary_pos_emb,
                                                           rotary_pos_cos, rotary_pos_sin, rotary_pos_cos_sin,
                                                           sequence_len_offset, **kwargs)
        q_pos_emb, k_pos_emb = rotary_pos_emb
        start = inference_context.sequence_len_offset
        end = start + key.size(0)
        # What megatron-core's forward applies to the keys read back from the cache, for the new positions only.
        key = mcore_attention.apply_rotary_pos_emb(
            key, k_pos_emb[start:end], config=self.config, cu_seqlens=None,
            mscale=mcore_attention._yarn_get_concentration_factor_from_config(self.config),
            cp_group=self.pg_collection.cp)
        query, key, value, _, attn_mask_type, block_table = super()._adjust_key_value_for_inference(
            inference_context, query, key, value, None, rotary_pos_cos, rotary_pos_sin, rotary_pos_cos_sin,
            sequence_len_offset, **kwargs)
        # The queries are rotated by megatron-core's forward as before; the keys already are.
        return query, key, value, (q_pos_emb[start:end], None), attn_mask_type, block_table


# ----------------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------------


class DatasetConfigKeys:
    """Mixin for a ``MegatronDataset`` subclass (listed before it) whose config fields ``EXTRA_CONFIG_KEYS`` also name
    its cached index (megatron-core hashes the config's key attributes into the cache's file names)."""

    EXTRA_CONFIG_KEYS: tuple = ()

    @classmethod
    def _key_config_attributes(cls):
        from megatron.core.datasets.megatron_dataset import MegatronDataset

        return MegatronDataset._key_config_attributes() + list(cls.EXTRA_CONFIG_KEYS)


def _rank_zero(group=None):
    return 0


def build_datasets(builder) -> tuple:
    """``builder.build()`` (a ``BlendedMegatronDatasetBuilder``), also in one process without torch.distributed:
    megatron-core's ``BlendedDataset`` calls ``torch.distributed.get_rank()`` unguarded when it writes its index cache,
    which raises without a process group, so rank 0 is answered meanwhile."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return tuple(builder.build())
    with _answering_rank_zero():
        return tuple(builder.build())


@contextlib.contextmanager
def _answering_rank_zero():
    get_rank = torch.distributed.get_rank
    torch.distributed.get_rank = _rank_zero
    try:
        yield
    finally:
        torch.distributed.get_rank = get_rank


class HiddenStateLoss:
    """Mixin for megatron-core's ``GPTModel`` (listed before it): with labels, in training, on the last pipeline stage
    (no multi-token prediction, no inference context), the per-token loss [b, s] is ``self.loss_from_hidden(hidden
    [s, b, h], output weight, labels [b, s], loss_mask)`` instead of the output layer followed by
    ``compute_language_model_loss``; every other call is megatron-core's own ``_postprocess``."""

    def loss_from_hidden(self, hidden_states, weight, labels, loss_mask):
        raise NotImplementedError

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        if (labels is None or not self.post_process or kwargs.get("mtp_in_postprocess")
                or self.config.mtp_num_layers is not None or kwargs.get("inference_context") is not None
                or not self.training):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        weight = (self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights
                  else self.output_layer.weight)
        return self.loss_from_hidden(hidden_states, weight, labels, kwargs.get("loss_mask"))


def grad_norm_fp32_on_device(grads_for_norm, norm_type=2, grad_stats_parallel_group=None):
    """megatron-core's ``get_grad_norm_fp32`` for the L2 norm, left on the device: a 0-dim fp32 tensor (the same
    value: the per-tensor norms stacked, squared, summed over ``grad_stats_parallel_group``, square root). Other norm
    types and DTensor gradients (FSDP) go to megatron-core's own function."""
    from megatron.core.optimizer import clip_grads

    grads = [grads_for_norm] if isinstance(grads_for_norm, torch.Tensor) else list(grads_for_norm)
    if float(norm_type) != 2.0 or any(type(g) is not torch.Tensor and not isinstance(g, torch.nn.Parameter)
                                      for g in grads):
        return clip_grads.get_grad_norm_fp32(grads_for_norm, norm_type, grad_stats_parallel_group)
    device = grads[0].device if grads else torch.device(torch.cuda.current_device()) \
        if torch.cuda.is_available() else torch.device("cpu")
    norm = l2_norm_on_device(0, torch.zeros(1, dtype=torch.int, device=device), [grads], False)[0] \
        if grads else torch.zeros(1, dtype=torch.float, device=device)
    total = norm.float() ** 2
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=grad_stats_parallel_group)
    return total.sqrt().reshape(())


def clip_grads_on_device(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron-core's ``clip_grad_by_total_norm_fp32`` with the norm a device tensor: every gradient multiplied by
    min(1, max_norm / (total_norm + 1e-6)) without reading the norm on the host."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else parameters
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in params if getattr(p, attr, None) is not None]
    if not grads:
        return
    if not isinstance(total_norm, torch.Tensor):  # a float norm (another optimizer's): megatron-core's own
        from megatron.core.optimizer import clip_grads

        return clip_grads.clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad)
    coeff = (max_norm / (total_norm.float() + 1.0e-6)).clamp(max=1.0).to(grads[0].device)
    for g in grads:
        g.mul_(coeff)


def optimizer_step_without_host_syncs() -> None:
    """The optimizers' gradient norm and clipping on the device (``--no-step-syncs``): megatron-core's optimizer
    module calls them through its own bindings, rebound here. Idempotent, journaled."""
    if journal.done("step-syncs"):
        return
    from megatron.core.optimizer import optimizer as mcore_optimizer

    journal.set_attr(mcore_optimizer, "get_grad_norm_fp32", grad_norm_fp32_on_device)
    journal.set_attr(mcore_optimizer, "clip_grad_by_total_norm_fp32", clip_grads_on_device)
    journal.mark("step-syncs")
