"""One training run's resolved settings, built once before the model and frozen: the architecture (from the --load
checkpoint, --model or the flags, checked against each other), the layout, dtype, sequence length and batch split.
The parsed flags themselves are never changed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from aquila_npu.checkpoint.megatron_io import CheckpointInfo
from aquila_npu.device.backends import FusedOps
from aquila_npu.errors import UsageError
from aquila_npu.models import arch_flags
from aquila_npu.models.dtypes import dtype_name
from aquila_npu.models.registry import MODELS, ModelSpec, get_model_spec
from aquila_npu.training.speed import StepSwitches
from aquila_npu.weights.mapping import Layout


@dataclass(frozen=True)
class RunConfig:
    spec: ModelSpec
    layout: Layout
    params_dtype: torch.dtype
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    data_parallel_size: int
    num_microbatches: int  # per iteration and data-parallel rank
    sequence_parallel: bool  # megatron-core sequence parallelism (only at tp > 1, as Megatron-LM)
    fused: FusedOps
    switches: StepSwitches  # the training-step switches (issue 28), read from the flags once
    checkpoint: Optional[CheckpointInfo]  # what --load holds (None: nothing there, random weights)

    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def pp(self) -> int:
        return self.layout.pp


def params_dtype(args) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def architecture(args, checkpoint: Optional[CheckpointInfo], tokenizer_vocab: Optional[int]) -> ModelSpec:
    """The model: the checkpoint's, else --model's, else the flags'; given flags must agree with it."""
    flags = arch_flags.given(args)
    base, source = None, None
    if args.model:
        if args.model.lower() not in MODELS:
            raise UsageError(f"--model {args.model}: unknown; known: {', '.join(sorted(MODELS))}")
        base, source = get_model_spec(args.model), f"--model {args.model}"
    if checkpoint is not None:
        if base is not None and not arch_flags.same_architecture(base, checkpoint.spec):
            raise UsageError(f"--model {args.model} does not match the architecture of the --load checkpoint "
                             f"{args.load} ({checkpoint.spec.name})")
        base, source = checkpoint.spec, "checkpoint"
    if base is not None:
        arch_flags.check(base, flags, source, where=args.load if source == "checkpoint" else "")
        spec = base
    else:
        spec = arch_flags.spec_from_flags(flags, vocab_size=tokenizer_vocab,
                                          default_positions=args.seq_length or 2048,
                                          torch_dtype=dtype_name(params_dtype(args)))
    if tokenizer_vocab is not None and tokenizer_vocab > spec.vocab_size:
        raise UsageError(f"--tokenizer-name-or-path {args.tokenizer_name_or_path} has {tokenizer_vocab} tokens, "
                         f"more than the model's vocabulary ({spec.vocab_size})")
    return spec


def resolve(args, checkpoint: Optional[CheckpointInfo], tokenizer_vocab: Optional[int], world_size: int) -> RunConfig:
    spec = architecture(args, checkpoint, tokenizer_vocab)
    seq_length = args.seq_length or spec.max_position_embeddings
    if seq_length > spec.max_position_embeddings:
        raise UsageError(f"--seq-length {seq_length} exceeds --max-position-embeddings "
                         f"{spec.max_position_embeddings}")
    divisible = args.make_vocab_size_divisible_by
    if checkpoint is not None:
        saved = checkpoint.layout.make_vocab_size_divisible_by
        if divisible is not None and divisible != saved:
            raise UsageError(f"--make-vocab-size-divisible-by {divisible} contradicts the --load checkpoint's "
                             f"{saved}")
        divisible = saved
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise UsageError(f"{world_size} process{'es are' if world_size > 1 else ' is'} not a multiple of "
                         f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp}: launch "
                         f"{tp * pp} (or a multiple) with torchrun --nproc-per-node")
    layout = Layout(spec, tp, pp, divisible or 1)
    dp = world_size // (tp * pp)
    gbs = args.global_batch_size or args.micro_batch_size * dp
    if gbs % (args.micro_batch_size * dp):
        raise UsageError(f"--global-batch-size {gbs} is not a multiple of --micro-batch-size "
                         f"{args.micro_batch_size} x data-parallel size {dp}")
    return RunConfig(spec=spec, layout=layout, params_dtype=params_dtype(args), seq_length=seq_length,
                     micro_batch_size=args.micro_batch_size, global_batch_size=gbs, data_parallel_size=dp,
                     num_microbatches=gbs // (args.micro_batch_size * dp),
                     sequence_parallel=args.sequence_parallel and tp > 1, fused=FusedOps.from_args(args),
                     switches=StepSwitches.from_args(args), checkpoint=checkpoint)
