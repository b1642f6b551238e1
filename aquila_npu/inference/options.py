"""What the inference commands' flags resolve to (``ModelOptions``, ``SamplingParams``) and the checks of their input
that need no model. Importing this module imports neither torch nor megatron-core: ``--help`` and input errors of
generate and evaluate come before either is imported (``aquila_npu.inference.session`` loads the model)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Optional

from aquila_npu.data.tokenizer import check_tokenizer_path
from aquila_npu.device.fused import FusedOps
from aquila_npu.errors import UsageError
from aquila_npu.flags import check_positive
from aquila_npu.models import arch_flags

if TYPE_CHECKING:  # annotations only
    import torch


@dataclass(frozen=True)
class ModelOptions:
    """What to load and where to run it (the inference commands' model flags, resolved)."""

    load: str
    tokenizer: str
    use_fast: bool = True
    tokenizer_type: str = "PretrainedFromHF"
    tp: Optional[int] = None  # default: the checkpoint's (and it must be the checkpoint's)
    pp: Optional[int] = None
    device: str = "auto"
    params_dtype: Optional[torch.dtype] = None  # default: the checkpoint's
    fused: FusedOps = FusedOps()
    architecture: Mapping[str, object] = field(default_factory=dict)  # given architecture flags, checked
    seq_length: Optional[int] = None  # longest sequence to run (capped at the model's positions)
    lora_load: Optional[str] = None  # an adapter checkpoint applied on the base without merging


@dataclass(frozen=True)
class SamplingParams:
    """``greedy``: argmax. Otherwise logits / temperature, keep the top_k (0 = all), then the smallest set of tokens
    whose probability reaches top_p (1.0 = all), and draw one (Hugging Face's order of the three warpers)."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 1234

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature {self.temperature} must be > 0 (use greedy decoding for 0)")
        if self.top_k < 0:
            raise ValueError(f"top_k {self.top_k} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p {self.top_p} must be in (0, 1]")


def check_load_dir(path: str) -> None:
    """``--load`` must be a directory (the converter writes one)."""
    if not os.path.isdir(path):
        raise UsageError(f"--load {path}: no such directory (convert a Hugging Face model first with "
                         "tools/checkpoint/convert_ckpt.py)")


def model_options(args) -> ModelOptions:
    """The inference commands' model flags (``aquila_npu.cli.inference_args``) resolved and checked."""
    check_positive(args, "tensor_model_parallel_size", "pipeline_model_parallel_size", "micro_batch_size",
                   "seq_length")
    flags = arch_flags.given(args)
    arch_flags.validate(flags)
    if args.use_mc2:
        raise UsageError("--use-mc2 fuses the communication of sequence-parallel training into its matmuls; generation "
                         "and evaluation have no sequence parallelism: drop --use-mc2")
    check_load_dir(args.load)
    if getattr(args, "lora_load", None) and not os.path.isdir(args.lora_load):
        raise UsageError(f"--lora-load {args.lora_load}: no such directory (an adapter checkpoint saved by a LoRA or "
                         "QLoRA run, or converted with convert_ckpt.py --loader peft)")
    check_tokenizer_path(args.tokenizer_name_or_path)
    dtype = None
    if args.fp16 or args.bf16:  # torch only now: input errors above come before it is imported
        from aquila_npu.models.dtypes import DTYPES

        dtype = DTYPES["fp16" if args.fp16 else "bf16"]
    return ModelOptions(load=args.load, tokenizer=args.tokenizer_name_or_path, use_fast=not args.tokenizer_not_use_fast,
                        tokenizer_type=args.tokenizer_type, tp=args.tensor_model_parallel_size,
                        pp=args.pipeline_model_parallel_size, device=args.device, params_dtype=dtype,
                        fused=FusedOps.from_args(args), architecture=flags, seq_length=args.seq_length,
                        lora_load=getattr(args, "lora_load", None))
