"""What generation and evaluation share once their flags are parsed: the checkpoint read and checked once (before
any process group, so every rank fails alike), the tokenizer, the device, this rank's model stage, the longest
sequence to run, and the sharing of work among data-parallel replicas.

    session = Session.start(ModelOptions(load=..., tokenizer=...))
    mine = shard(items)                             # [(index, item)] of this data-parallel replica
    results = gather({i: f(item) for i, item in mine})   # every replica's results, by index
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, TypeVar

import torch
from megatron.core import parallel_state as ps

from aquila_npu.checkpoint.load_model import (LoadedModel, check_parallel_sizes, load_model_for_inference,
                                              relayout_command)
from aquila_npu.checkpoint.megatron_io import CheckpointInfo
from aquila_npu.data.tokenizer import load_tokenizer, vocab_size
from aquila_npu.device.setup import Device, setup
from aquila_npu.errors import UsageError
from aquila_npu.inference.options import ModelOptions, check_load_dir  # noqa: F401 - ModelOptions: also from here
from aquila_npu.models import arch_flags
from aquila_npu.models.dtypes import dtype_name

T = TypeVar("T")


def data_parallel() -> Tuple[int, int]:
    """(this replica's rank, number of data-parallel replicas); (0, 1) without torch.distributed."""
    if not torch.distributed.is_initialized():
        return 0, 1
    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()


def reporting_rank() -> bool:
    """True on the one rank of each replica whose results count: tensor-parallel rank 0 of the first pipeline stage
    (every rank of a replica holds the same results)."""
    if not torch.distributed.is_initialized():
        return True
    return ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage(ignore_virtual=True)


def shard(items: Sequence[T]) -> List[Tuple[int, T]]:
    """(index, item) of the items this data-parallel replica handles: every dp-th, round robin. A result must not
    depend on which replica computes it, so the gathered results equal one process's."""
    rank, size = data_parallel()
    return [(i, item) for i, item in enumerate(items) if i % size == rank]


def gather(results: Dict[int, object]) -> Dict[int, object]:
    """Every replica's ``{index: result}`` merged, on every rank."""
    if data_parallel()[1] == 1:
        return dict(results)
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, results if reporting_rank() else {})
    merged: Dict[int, object] = {}
    for part in parts:
        merged.update(part)
    return merged


def check(opts: ModelOptions, world: Optional[int] = None) -> CheckpointInfo:
    """Every input error before any process group exists, for ``world`` processes (default: torchrun's
    WORLD_SIZE, else 1); the checkpoint's description."""
    check_load_dir(opts.load)
    info = CheckpointInfo.read(opts.load)
    layout = info.layout
    tp, pp = opts.tp or layout.tp, opts.pp or layout.pp
    check_parallel_sizes(info, tp, pp)
    arch_flags.check(info.spec, opts.architecture, "checkpoint", where=opts.load, padded_vocab=layout.padded_vocab,
                     tp=layout.tp)
    positions = info.spec.max_position_embeddings
    if opts.seq_length is not None and opts.seq_length > positions:
        raise UsageError(f"--seq-length {opts.seq_length}: the model in {opts.load} has {positions} positions "
                         f"(max_position_embeddings); give at most {positions}, or leave --seq-length out")
    if opts.lora_load:  # (LoRA / QLoRA adapters on the base, unmerged: its model and layout)
        from aquila_npu.lora.stage import check_adapter

        check_adapter(info, opts.lora_load)
    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    if world % (tp * pp):
        raise UsageError(f"{world} process(es) cannot run the tp{tp}-pp{pp} checkpoint {opts.load}: start a multiple "
                         f"of {tp * pp} (torchrun --nproc-per-node {tp * pp} ...), or convert it for one process: "
                         f"{relayout_command(opts.load, 1, 1)}")
    return info


@dataclass
class Session:
    device: Device
    loaded: LoadedModel
    tokenizer: object
    max_length: int  # the longest sequence (prompt + generated tokens) this session runs (<= the model's positions)

    @classmethod
    def start(cls, opts: ModelOptions) -> "Session":
        info = check(opts)
        tokenizer = load_tokenizer(opts.tokenizer, use_fast=opts.use_fast, tokenizer_type=opts.tokenizer_type)
        if vocab_size(tokenizer) > info.spec.vocab_size:
            raise UsageError(f"--tokenizer-name-or-path {opts.tokenizer}: {vocab_size(tokenizer)} tokens, more than "
                             f"the {info.spec.vocab_size} of the checkpoint's vocabulary: the tokenizer of another "
                             "model")
        device = setup(opts.device, opts.fused)
        if opts.lora_load or info.is_nf4:  # adapters unmerged, or QLoRA's 4-bit base (aquila_npu.lora.stage)
            from aquila_npu.lora.stage import load_adapted_for_inference

            loaded = load_adapted_for_inference(info, device, opts.lora_load, params_dtype=opts.params_dtype)
        else:
            loaded = load_model_for_inference(info, device, params_dtype=opts.params_dtype)
        positions = info.spec.max_position_embeddings
        return cls(device, loaded, tokenizer, min(opts.seq_length or positions, positions))

    @property
    def is_rank0(self) -> bool:
        return torch.distributed.get_rank() == 0

    def describe(self) -> str:
        """``<dir> (tp2-pp1, bfloat16) on cpu[, 2 data-parallel replicas]`` for banners."""
        lo = self.loaded
        dp = data_parallel()[1]
        return (f"{lo.load_dir} (tp{lo.layout.tp}-pp{lo.layout.pp}, {dtype_name(lo.params_dtype)}"
                f"{getattr(lo, 'adapter_note', '')}) on {self.device.name}"
                + (f", {dp} data-parallel replicas" if dp > 1 else ""))

    def eos_id(self) -> int:
        """The tokenizer's end-of-sequence id (``</s>`` for Aquila2), else the checkpoint's."""
        tid = getattr(self.tokenizer, "eos_token_id", None)
        return self.loaded.spec.eos_token_id if tid is None else int(tid)

    def pad_id(self) -> int:
        """Filler for right-padded batches (never attended to by real tokens): pad, else eos, else 0."""
        for tid in (getattr(self.tokenizer, "pad_token_id", None), getattr(self.tokenizer, "eos_token_id", None)):
            if tid is not None:
                return int(tid)
        return 0
