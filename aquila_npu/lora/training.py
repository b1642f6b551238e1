"""LoRA in a training run, as a model transform of ``aquila_npu.training`` (``training.transforms``):

    transform = training.transform(args)              # None: LoRA off (flags checked against --lora-load first)
    aquila_npu.training.run.run(args, transform)      # the run calls the transform's methods:
        apply(stage, ...)                             # adapters on the built stage, before DDP (layers.apply_lora)
        load(args, base_info, model=ddp, ...)         # the --load base (weights only), then --lora-load's adapter
        describe(ddp, optimizer)                      # trainable parameters, optimizer state
        save(args, save_dir, iteration, model=ddp, ...)   # adapters only, atomically

The base is frozen: it has no gradient and megatron-core's DDP and optimizer skip it, so it has no optimizer state.
"""

from __future__ import annotations

import argparse
from typing import Optional, Tuple

import torch

from aquila_npu.checkpoint import megatron_io
from aquila_npu.checkpoint.megatron_io import CheckpointInfo
from aquila_npu.errors import CheckpointError, UsageError
from aquila_npu.lora import checkpoint as adapter_ckpt
from aquila_npu.lora import settings as lora_settings
from aquila_npu.lora.settings import LoraSettings
from aquila_npu.lora.state import Adapters, BaseWeights, optimizer_state_bytes, parameter_counts
from aquila_npu.training import checkpointing
from aquila_npu.weights.mapping import Layout


def transform(args: argparse.Namespace) -> Optional["LoraTransform"]:
    """The run's LoRA transform, None when LoRA is off (the flags checked first)."""
    s = settings(args)
    if s is not None and getattr(args, "qlora", False):
        from aquila_npu.lora.qlora import QLoraTransform

        return QLoraTransform(s)
    return None if s is None else LoraTransform(s)


class LoraTransform:
    """LoRA as a model transform of a training run (``aquila_npu.training.transforms.ModelTransform``)."""

    def __init__(self, lora: LoraSettings):
        self.settings = lora

    def check(self, args, checkpoint, layout: Layout, data_parallel_size: int) -> None:
        """Everything ``load`` would refuse that the checkpoints' metadata tells, before the run creates any output
        or process group (``check``)."""
        check(args, checkpoint, layout, data_parallel_size)

    def backend(self, backend):
        """The device backend the stages are built from (QLoRA's 4-bit linears: ``qlora.QLoraTransform``)."""
        return backend

    def apply(self, stage, config, layout: Layout, pp_rank: int, seed: int):
        from aquila_npu.lora.layers import apply_lora  # peft (and transformers): only LoRA runs import them

        return apply_lora(stage, config, self.settings, layout, pp_rank, seed)

    def load(self, args, checkpoint, **kw) -> Tuple[int, int, str]:
        return load(args, checkpoint, **kw)

    def save(self, args, save_dir, iteration: int, **kw) -> None:
        save(args, self.settings, save_dir, iteration, **kw)

    def describe(self, model, optimizer) -> str:
        return describe(model, optimizer, self.settings)


def settings(args: argparse.Namespace) -> Optional[LoraSettings]:
    """The run's LoRA settings (flags checked against the --lora-load adapter), None when LoRA is off."""
    saved = adapter_ckpt.find(args.lora_load)
    if args.lora_load and saved is None:
        raise CheckpointError(f"--lora-load {args.lora_load}: no adapter checkpoint there (no "
                              f"{megatron_io.TRACKER})")
    s = lora_settings.resolve(args, saved.settings if saved else None)
    if s is not None and not args.load:
        raise UsageError("LoRA needs --load: the base model the adapters are trained on")
    return s


def check(args: argparse.Namespace, base: Optional[CheckpointInfo], layout: Layout, data_parallel_size: int) -> None:
    """What ``load`` refuses, from the metadata alone (no device, no process group, no output yet): no base; a base
    or adapter of another tensor/pipeline layout than the run's; an adapter of another model than the base; adapter
    optimizer state that this run's --use-distributed-optimizer / data-parallel size cannot resume."""
    if base is None:
        raise CheckpointError(f"--load {args.load}: no checkpoint there (the base model LoRA trains on)")
    if base.is_nf4 and not getattr(args, "qlora", False):
        raise CheckpointError(f"--load {args.load} holds a 4-bit NF4 base (convert_ckpt.py --qlora-nf4): add --qlora")
    base.check_resume(layout, finetune=True, no_load_optim=True,
                      use_distributed_optimizer=args.use_distributed_optimizer, data_parallel_size=data_parallel_size)
    adapter = adapter_ckpt.find(args.lora_load)
    if adapter is None:
        return
    adapter_ckpt.check_same_model(adapter, layout, args.load)
    adapter.info.check_resume(layout, finetune=args.finetune, no_load_optim=args.no_load_optim,
                              use_distributed_optimizer=args.use_distributed_optimizer,
                              data_parallel_size=data_parallel_size, flag="--lora-load")


def load(args: argparse.Namespace, base: CheckpointInfo, *, model, optimizer, scheduler, layout: Layout,
         params_dtype: torch.dtype, device: str, load_base=None) -> Tuple[int, int, str]:
    """Base weights from the --load checkpoint ``base`` (always weights only; ``load_base(model, optimizer)`` when
    given: QLoRA's NF4 base), then the adapter from --lora-load: resumed exactly (iteration, optimizer, scheduler,
    RNG) unless --finetune / --no-load-optim / --no-load-rng say otherwise, or the adapter was converted (weights
    only). Without --lora-load the adapters keep their initial values."""
    if base is None:
        raise CheckpointError(f"--load {args.load}: no checkpoint there (the base model LoRA trains on)")
    if load_base is not None:
        load_base(model, optimizer)
    else:
        checkpointing.load(base, model=BaseWeights(model), optimizer=optimizer, scheduler=scheduler, layout=layout,
                           params_dtype=params_dtype, finetune=True, no_load_optim=True, no_load_rng=True,
                           use_distributed_optimizer=args.use_distributed_optimizer, device=device)
    adapter = adapter_ckpt.find(args.lora_load)
    if adapter is None:
        return 0, 0, "base weights, new adapters"
    adapter_ckpt.check_same_model(adapter, layout, args.load)
    iteration, consumed, what = checkpointing.load(  # (loads optimizer state under no_grad: fp32 adapters)
        adapter.info, model=Adapters(model), optimizer=optimizer, scheduler=scheduler, layout=layout,
        params_dtype=adapter_ckpt.ADAPTER_DTYPE, finetune=args.finetune, no_load_optim=args.no_load_optim,
        no_load_rng=args.no_load_rng, use_distributed_optimizer=args.use_distributed_optimizer,
        device=device)
    return iteration, consumed, f"base weights, adapter {what.replace('weights', 'tensors')} from {args.lora_load}"


def save(args: argparse.Namespace, settings: LoraSettings, save_dir: checkpointing.SaveDir, iteration: int,
         *, model, optimizer, scheduler, layout: Layout, consumed_samples: int, device: str) -> None:
    """The adapters and their optimizer state only, in ``training.checkpointing``'s atomic layout (into the run's
    claimed ``save_dir``); the settings travel in ``training_args``."""
    recorded = argparse.Namespace(**{**vars(args), **settings.to_dict()})
    checkpointing.save(save_dir, iteration, model=Adapters(model), optimizer=optimizer, scheduler=scheduler,
                       layout=layout, params_dtype=adapter_ckpt.ADAPTER_DTYPE, consumed_samples=consumed_samples,
                       args=recorded, use_distributed_optimizer=args.use_distributed_optimizer, device=device)


def describe(model, optimizer, settings: LoraSettings) -> str:
    """The start-up line: trainable parameters and this rank's optimizer-state bytes (collective: every rank)."""
    n = parameter_counts(model)
    opt = optimizer_state_bytes(optimizer)
    ranks = "".join(f", {t} rank {r}" for t, r in settings.ranks)
    return (f"LoRA r {settings.r} alpha {settings.alpha:g} (scaling {settings.scaling:g}{ranks}) on "
            f"{' '.join(settings.targets)}: {n['trainable']:,} trainable parameters of {n['total']:,} "
            f"({100 * n['trainable'] / n['total']:.3g}%), base frozen; optimizer state on this rank "
            f"{opt['total'] / 2 ** 20:.3g} MiB ({n['trainable_this_rank']:,} parameters)")
