"""A LoRA model's two parts: the frozen base (loaded from the converter's checkpoints, never saved again) and the
adapters (the only tensors a LoRA checkpoint holds), and what they cost.

``BaseWeights(model)`` and ``Adapters(model)`` stand in for the model where ``aquila_npu.training.checkpointing``
reads or writes one: ``checkpointing.load(base_dir, model=BaseWeights(model), ...)`` fills the base from a
converted checkpoint (keys renamed by ``mapping.lora_model_key``), ``checkpointing.save(..., model=Adapters(model))``
writes the adapters only and ``checkpointing.load(lora_dir, model=Adapters(model), params_dtype=torch.float32)``
reads them back (adapters are fp32 whatever the base's dtype).
"""

from __future__ import annotations

from collections import namedtuple
from typing import Dict

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from torch import Tensor

from aquila_npu.lora.layers import lora_modules
from aquila_npu.weights.load import load_stage_state
from aquila_npu.weights.mapping import lora_model_key

Incompatible = namedtuple("Incompatible", ["missing_keys", "unexpected_keys"])  # as torch's load_state_dict result


def is_adapter_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def _stage(model) -> torch.nn.Module:
    """The GPTModel stage inside a DDP wrapper (or the stage itself)."""
    return getattr(model, "module", model)


def targets_of(stage: torch.nn.Module):
    return {name.split(".")[-1] for name, _ in lora_modules(stage)}


def adapter_state_dict(stage: torch.nn.Module) -> Dict[str, Tensor]:
    return {k: v for k, v in stage.state_dict().items() if is_adapter_key(k) and not k.endswith("_extra_state")}


def load_adapters(stage: torch.nn.Module, state: Dict[str, Tensor]) -> Incompatible:
    """Copy adapter tensors into the stage's adapters (kept fp32); other keys are reported unexpected."""
    params = {k: v for k, v in stage.named_parameters() if is_adapter_key(k)}
    unexpected = [k for k in state if k not in params]
    with torch.no_grad():
        for k, v in state.items():
            if k in params:
                if tuple(v.shape) != tuple(params[k].shape):
                    raise KeyError(f"{k}: shape {tuple(v.shape)} in the checkpoint, {tuple(params[k].shape)} in "
                                   "the model (another --lora-r or layout?)")
                params[k].copy_(v)
    return Incompatible([k for k in params if k not in state], unexpected)


def load_base(stage: torch.nn.Module, state: Dict[str, Tensor]) -> None:
    """Load a converted (or full-training) checkpoint's weights into the base of a LoRA stage."""
    targets = targets_of(stage)
    load_stage_state(stage, {lora_model_key(k, targets): v for k, v in state.items()}, optional=is_adapter_key)


class _Part:
    """What ``training.checkpointing`` calls on ``model.module``: ``state_dict()`` and ``load_state_dict()``."""

    adapters: bool

    def __init__(self, model):
        self.module = self
        self._stage = _stage(model)

    def state_dict(self) -> Dict[str, Tensor]:
        if not self.adapters:
            raise RuntimeError("the base of a LoRA model is never saved")
        return adapter_state_dict(self._stage)

    def load_state_dict(self, state: Dict[str, Tensor], strict: bool = False) -> Incompatible:
        if self.adapters:
            return load_adapters(self._stage, state)
        load_base(self._stage, state)
        return Incompatible([], [])


class BaseWeights(_Part):
    """The frozen base of a LoRA model, loaded from a converted or full-training checkpoint."""

    adapters = False


class Adapters(_Part):
    """The adapters of a LoRA model: all a LoRA checkpoint holds."""

    adapters = True


def parameter_counts(model) -> Dict[str, int]:
    """Trainable and all parameters of the whole model (summed over pipeline stages and tensor-parallel ranks,
    each replicated tensor once), and this rank's trainable ones."""
    stage = _stage(model)
    mine = [p for p in stage.parameters() if param_is_not_tensor_parallel_duplicate(p)]
    quantised = sum(m.nf4_parameters() for m in stage.modules() if hasattr(m, "nf4_parameters"))  # QLoRA's base
    counts = torch.tensor([sum(p.numel() for p in mine if p.requires_grad), sum(p.numel() for p in mine) + quantised],
                          dtype=torch.float64)
    if torch.distributed.is_initialized() and ps.model_parallel_is_initialized():
        torch.distributed.all_reduce(counts, group=ps.get_model_parallel_group())
    return {"trainable": int(counts[0]), "total": int(counts[1]),
            "trainable_this_rank": sum(p.numel() for p in stage.parameters() if p.requires_grad)}


def optimizer_state_bytes(optimizer) -> Dict[str, int]:
    """Bytes of optimizer state on this rank: fp32 main copies of low-precision parameters plus Adam's moments.

    Read from the optimizer's own tensors: the moments once allocated (after the first step), before that the two
    ``zeros_like`` torch's Adam will allocate for each main parameter it holds."""
    copies = moments = 0
    allocated = False
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for attr in ("fp32_from_float16_groups", "shard_fp32_from_float16_groups"):
            copies += sum(p.numel() * p.element_size() for group in getattr(opt, attr, []) for p in group)
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state.get(p, {})
                if state:
                    allocated = True
                    moments += sum(v.numel() * v.element_size() for v in state.values()
                                   if torch.is_tensor(v) and v.dim() > 0)
                else:
                    moments += 2 * p.numel() * p.element_size()
    return {"main_param_copies": copies, "adam_moments": moments, "total": copies + moments,
            "moments_allocated": int(allocated)}
