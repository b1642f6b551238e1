"""LoRA on megatron-core's tensor-parallel linears with Hugging Face PEFT (as MindSpeed-LLM does).

``apply_lora(stage, config, settings, layout, pp_rank)`` injects adapters into a built GPTModel stage in place:
peft's ``inject_adapter_in_model`` wraps every targeted ``linear_qkv`` / ``linear_proj`` / ``linear_fc1`` /
``linear_fc2`` and freezes everything else, giving MindSpeed-LLM's parameter names
(``...linear_qkv.base_layer.weight``, ``...linear_qkv.lora_A.default.weight``, ``...lora_B.default.weight``).

The layer is peft's megatron-core ``LoraParallelLinear`` with the fixes peft 0.21.2 needs
(``aquila_npu.compat.peft.MegatronLoraLinear``): on a ColumnParallelLinear (qkv, fc1) A is a whole ``nn.Linear`` on
every rank and B a ColumnParallelLinear split by output; on a RowParallelLinear (proj, fc2) A is a RowParallelLinear
split by input and B a whole ``nn.Linear``; adapters in fp32 whatever the base dtype; scaling alpha / r.

Sequence parallelism: the whole (replicated) adapter matrices see only this rank's slice of the sequence (column: A
reads the sequence-split input, B all-gathers; row: A reduce-scatters, B reads the slice), so their gradients are
partial sums. They carry megatron-core's ``sequence_parallel`` parameter attribute (as its norms do), and
``finalize_model_grads`` all-reduces them over the tensor-parallel group. Without sequence parallelism the
ColumnParallelLinear B all-reduces its input gradient and the RowParallelLinear A all-reduces its output, so the
whole matrices get equal gradients on every rank.

Initial adapters do not depend on the layout: A of each (global layer, linear) is drawn whole (kaiming-uniform,
a = sqrt(5), as peft; from a generator seeded by the layer and linear) and split like the weight; B is zero. So tp1 and
tp2-pp2 runs start from the same adapter.
"""

from __future__ import annotations

import copy
import math
from typing import Iterator, Tuple

import torch
from megatron.core import parallel_state
from peft import LoraConfig, inject_adapter_in_model

from aquila_npu.compat.peft import MegatronLoraLinear, lora_config
from aquila_npu.lora.settings import LoraSettings
from aquila_npu.weights.mapping import LORA_ADAPTER, LORA_PAIRS, TABLE, Layout, lora_target, rank_slice


def peft_config(settings: LoraSettings, config) -> LoraConfig:
    """peft's LoraConfig for a megatron-core model with TransformerConfig ``config`` (copied: peft sets the copy's
    params_dtype to fp32 for the adapters)."""
    return lora_config(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                       target_modules=list(settings.targets), bias="none",
                       rank_pattern={t: settings.rank(t) for t, _ in settings.ranks},
                       alpha_pattern={t: settings.alpha_of(t) for t, _ in settings.ranks},
                       megatron_config=copy.copy(config), megatron_core="megatron.core")


def lora_modules(stage: torch.nn.Module) -> Iterator[Tuple[str, MegatronLoraLinear]]:
    return ((n, m) for n, m in stage.named_modules() if isinstance(m, MegatronLoraLinear))


def apply_lora(stage: torch.nn.Module, config, settings: LoraSettings, layout: Layout, pp_rank: int,
               seed: int = 1234) -> torch.nn.Module:
    """Inject adapters into one pipeline stage (a megatron-core GPTModel built from ``config``), in place, before
    it is wrapped for data parallelism; freezes the base and draws the initial adapters (layout-independent)."""
    mode = stage.training
    inject_adapter_in_model(peft_config(settings, config), stage, adapter_name=LORA_ADAPTER)
    stage.train(mode)  # the new modules (dropout) follow the stage's train / eval mode
    init_adapters(stage, layout, pp_rank, seed)
    if config.recompute_granularity == "full" and pp_rank == 0:
        # Full recomputation runs each layer block through a reentrant checkpoint, which back-propagates only when
        # an input requires grad; the (frozen) embedding's output does not (MindSpeed-LLM's
        # --lora-register-forward-hook does the same).
        stage.embedding.register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))
    return stage


def init_adapters(stage: torch.nn.Module, layout: Layout, pp_rank: int, seed: int) -> None:
    """A: whole kaiming-uniform (a = sqrt(5), fan-in the whole input) per global layer and linear, split like the
    base weight; B: zeros."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank() if layout.tp > 1 else 0
    layers = layout.stage_layers(pp_rank)
    for name, module in lora_modules(stage):
        target, local = name.split(".")[-1], int(name.split(".")[2])
        a, b = module.lora_A[LORA_ADAPTER].weight, module.lora_B[LORA_ADAPTER].weight
        whole = torch.empty(a.shape[0], module.in_features, dtype=torch.float32)
        g = torch.Generator().manual_seed(seed * 1000003 + layers[local] * 16 + _index(target))
        torch.nn.init.kaiming_uniform_(whole, a=math.sqrt(5), generator=g)
        row = LORA_PAIRS[target][0]
        with torch.no_grad():
            a.copy_(rank_slice(row, [whole] * len(row.hf), layout, tp_rank))
            b.zero_()


def _index(target: str) -> int:
    return [lora_target(r) for r in TABLE].index(target)
