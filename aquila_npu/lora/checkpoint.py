"""Adapter checkpoints: the Megatron directory layout of ``aquila_npu.checkpoint.megatron_io`` holding only adapter
tensors (MindSpeed-LLM's keys, ``...linear_qkv.lora_A.default.weight``), fp32.

    <dir>/latest_checkpointed_iteration.txt
    <dir>/iter_0000010/mp_rank_TT[_PPP]/model_optim_rng.pt     model = this rank's adapters (+ optimizer, ... when
                                                               saved by training)

Training writes them with ``training.checkpointing.save(..., model=state.Adapters(model))`` (atomic, resumable); the
LoRA settings travel in its ``training_args`` (``lora_target_modules``, ``lora_r``, ``lora_alpha``, ``lora_dropout``,
``lora_ranks``). A converted adapter (``convert.import_peft``) carries them under ``lora``.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from aquila_npu.checkpoint import megatron_io
from aquila_npu.checkpoint.convert import ITERATION
from aquila_npu.errors import CheckpointError
from aquila_npu.lora.settings import LoraSettings
from aquila_npu.models import arch_flags
from aquila_npu.outputs.atomic import AtomicDir
from aquila_npu.weights.mapping import Layout, hf_rank_to_mcore, lora_rows, mcore_stage_to_hf

ADAPTER_DTYPE = torch.float32


def _settings_of(ck: dict, root: str) -> LoraSettings:
    for entry in (ck.get("lora"), ck.get("training_args")):
        if entry and entry.get("lora_target_modules"):
            return LoraSettings.from_dict(entry)
    raise CheckpointError(f"{root}: not a LoRA adapter checkpoint (no LoRA settings in it)")


class AdapterCheckpoint:
    """A saved adapter: layout, settings, each rank's tensors, the whole adapter in HF PEFT names."""

    def __init__(self, root: str):
        self.root = root
        self.info = megatron_io.CheckpointInfo.read(root)
        self.iteration, self.layout = self.info.iteration, self.info.layout
        self.spec = self.layout.spec
        self.settings = _settings_of(self.info.load_rank(0, 0), root)

    def rank_file(self, tp_rank: int, pp_rank: int) -> dict:
        return megatron_io.load_rank(self.root, self.iteration, tp_rank, pp_rank, self.layout.pp)

    def stage_shards(self, stage: int):
        return [self.rank_file(r, stage)["model"] for r in range(self.layout.tp)]

    def peft_tensors(self) -> Dict[str, Tensor]:
        """The whole adapter in HF PEFT's saved names (``base_model.model.model.layers.0.self_attn.q_proj.lora_A
        .weight``); a fused linear's A appears under each of its HF modules."""
        out: Dict[str, Tensor] = {}
        rows = lora_rows(self.settings.targets)
        for stage in range(self.layout.pp):
            try:
                out.update(mcore_stage_to_hf(self.stage_shards(stage), self.layout, stage, rows))
            except KeyError as e:
                raise CheckpointError(f"{self.root}: {e.args[0]}") from None
        return out


def find(root: Optional[str]) -> Optional[AdapterCheckpoint]:
    """The adapter checkpoint in ``root``, None when the directory holds no checkpoint yet."""
    if not root or not os.path.exists(os.path.join(root, megatron_io.TRACKER)):
        return None
    return AdapterCheckpoint(root)


def check_same_model(adapter: AdapterCheckpoint, layout: Layout, base: str) -> None:
    if not arch_flags.same_architecture(adapter.spec, layout.spec):
        raise CheckpointError(f"the adapter in {adapter.root} is for another model than {base} "
                              f"({adapter.spec.name} vs {layout.spec.name})")


def write(save_dir: str, layout: Layout, settings: LoraSettings, get_peft: Callable[[str], Tensor]) -> None:
    """Write an adapter checkpoint (atomically: a temporary directory renamed into place) from HF PEFT-named
    tensors (``get_peft(name)``), split for ``layout``."""
    rows = lora_rows(settings.targets)
    with AtomicDir(save_dir, "the LoRA adapter checkpoint") as tmp:
        for stage in range(layout.pp):
            for rank in range(layout.tp):
                sd = hf_rank_to_mcore(get_peft, layout, stage, rank, cast=lambda t: t.to(ADAPTER_DTYPE), table=rows)
                megatron_io.save_rank(tmp, ITERATION, layout, stage, rank, sd, ADAPTER_DTYPE,
                                      {"lora": settings.to_dict()})
        megatron_io.write_tracker(tmp, ITERATION)
