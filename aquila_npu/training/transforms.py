"""Model transforms: what changes the model a run trains, plugged into the run from outside (as torchtitan's model
converters), so that training knows nothing of them. LoRA is one (``aquila_npu.lora.training.LoraTransform``,
given by ``aquila_npu.jobs.pretrain``).

A transform is applied to each pipeline stage right after it is built (before DDP and the optimizer see its
parameters), owns what the run loads at start (its base and its own state) and what a checkpoint of the run holds,
and adds a line to the start-up banner.
"""

from __future__ import annotations

from typing import Protocol, Tuple

import torch


class ModelTransform(Protocol):
    def backend(self, backend):
        """The device backend the stages are built from (the device's own, or one that builds other modules:
        QLoRA's 4-bit linears)."""

    def check(self, args, checkpoint, layout, data_parallel_size: int) -> None:
        """Refuse (a UserError) what ``load`` would refuse that the checkpoints' metadata tells, before the run
        creates any output, device or process group."""

    def apply(self, stage: torch.nn.Module, config, layout, pp_rank: int, seed: int) -> torch.nn.Module:
        """The stage to train (changed in place or replaced)."""

    def load(self, args, checkpoint, *, model, optimizer, scheduler, layout, params_dtype, device: str
             ) -> Tuple[int, int, str]:
        """Load what the run starts from: (iteration, consumed samples, what was loaded)."""

    def save(self, args, save_dir, iteration: int, *, model, optimizer, scheduler, layout, consumed_samples: int,
             device: str) -> None:
        """Write a checkpoint of the run into the claimed ``save_dir`` (``training.checkpointing.SaveDir``)."""

    def describe(self, model, optimizer) -> str:
        """The start-up line (collective: every rank calls it)."""
