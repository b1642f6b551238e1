"""Command-line pieces shared by ``aquila_npu.generate`` and ``aquila_npu.evaluate``.

The flags are ModelLink's (so its generate/evaluate scripts' flags parse), but only ``--load`` and
``--tokenizer-name-or-path`` are needed: the architecture comes from the checkpoint. Architecture flags that are
given are checked against it.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from aquila_npu.errors import (CheckpointError, DataError, FusedKernelUnavailable, LayoutError, PromptTooLong,
                               UsageError)
from aquila_npu.checkpoint.load_model import (LoadedModel, check_architecture, check_parallel_sizes,
                                              load_model_for_inference, read_checkpoint, relayout_command)
from aquila_npu.data.tokenizer import load_tokenizer, vocab_size
from aquila_npu.device.backends import FusedOps
from aquila_npu.device.setup import setup
from aquila_npu.parallel import destroy_model_parallel

ARCH_DESTS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "max_position_embeddings", "norm_epsilon", "rotary_base", "group_query_attention",
              "position_embedding_type", "normalization", "untie_embeddings_and_output_weights",
              "make_vocab_size_divisible_by")

# Accepted so ModelLink command lines parse; they change nothing here.
IGNORED_SWITCHES = ("--exit-on-missing-checkpoint", "--no-load-optim", "--no-load-rng", "--swiglu",
                    "--disable-bias-linear", "--no-masked-softmax-fusion", "--attention-softmax-in-fp32",
                    "--no-gradient-accumulation-fusion", "--sequence-parallel", "--use-mc2")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--load", required=True, metavar="DIR",
                   help="Megatron checkpoint directory written by tools/checkpoint/convert_ckpt.py (or training); "
                        "the architecture, vocabulary and tp/pp split are read from it")
    g.add_argument("--tokenizer-name-or-path", required=True, metavar="DIR",
                   help="folder with the Hugging Face tokenizer files (the original HF model folder)")
    g.add_argument("--tokenizer-type", default="PretrainedFromHF", choices=["PretrainedFromHF"],
                   help="tokenizer kind (only PretrainedFromHF, as in ModelLink's scripts)")
    g.add_argument("--tokenizer-not-use-fast", action="store_true",
                   help="load the slow (Python) tokenizer, as ModelLink's scripts do; ids are the same for Aquila2")
    g.add_argument("--tensor-model-parallel-size", type=int, default=None, metavar="T",
                   help="tensor-parallel size (default: the checkpoint's); must equal the checkpoint's")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=None, metavar="P",
                   help="pipeline-parallel size (default: the checkpoint's); must equal the checkpoint's")
    g.add_argument("--device", default="auto", choices=["auto", "npu", "cuda", "cpu"],
                   help="where to run: auto (default: npu, else cuda, else cpu), npu, cuda or cpu")
    dt = g.add_mutually_exclusive_group()
    dt.add_argument("--fp16", action="store_true", help="compute in float16 (default: the checkpoint's dtype)")
    dt.add_argument("--bf16", action="store_true", help="compute in bfloat16 (default: the checkpoint's dtype)")
    g.add_argument("--micro-batch-size", type=int, default=None, metavar="B",
                   help="prompts (or evaluation sequences) per forward pass")
    g.add_argument("--seq-length", type=int, default=None, metavar="N",
                   help="longest sequence (prompt + generated tokens) to run (default and maximum: the model's "
                        "max_position_embeddings)")
    f = p.add_argument_group("fused kernels (ModelLink switches; need an Ascend NPU or, on CUDA, Transformer Engine)")
    f.add_argument("--use-fused-rmsnorm", action="store_true", help="fused RMSNorm kernel")
    f.add_argument("--use-flash-attn", action="store_true", help="fused (flash) attention kernel")
    f.add_argument("--use-fused-rotary-pos-emb", action="store_true", help="fused rotary embedding kernel")
    f.add_argument("--use-fused-swiglu", action="store_true", help="fused SwiGLU kernel")
    a = p.add_argument_group("architecture (optional; read from the checkpoint, and checked against it when given)")
    a.add_argument("--num-layers", type=int, help="transformer layers")
    a.add_argument("--hidden-size", type=int, help="hidden size")
    a.add_argument("--ffn-hidden-size", type=int, help="MLP intermediate size")
    a.add_argument("--num-attention-heads", type=int, help="attention heads")
    a.add_argument("--group-query-attention", action="store_true", help="grouped-query attention")
    a.add_argument("--num-query-groups", type=int, help="key/value heads (with --group-query-attention)")
    a.add_argument("--max-position-embeddings", type=int, help="maximum positions")
    a.add_argument("--position-embedding-type", help="must be rope")
    a.add_argument("--normalization", help="must be RMSNorm")
    a.add_argument("--norm-epsilon", type=float, help="RMSNorm epsilon")
    a.add_argument("--rotary-base", type=float, help="RoPE theta")
    a.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="separate input embedding and output layer (Aquila2 has them untied)")
    a.add_argument("--make-vocab-size-divisible-by", type=int,
                   help="vocabulary padding the checkpoint was converted with")
    c = p.add_argument_group("ignored (accepted for ModelLink command lines)")
    for flag in IGNORED_SWITCHES:
        c.add_argument(flag, action="store_true", help="no effect here")


def check_paths(args: argparse.Namespace) -> None:
    """Cheap checks of the inputs every rank makes before anything starts."""
    if not os.path.isdir(args.load):
        raise UsageError(f"--load {args.load}: no such directory (convert a Hugging Face model first with "
                         "tools/checkpoint/convert_ckpt.py)")
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "micro_batch_size", "seq_length"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} {v} must be >= 1")


def architecture_flags(args: argparse.Namespace) -> dict:
    flags = {k: getattr(args, k, None) for k in ARCH_DESTS}
    for switch in ("group_query_attention", "untie_embeddings_and_output_weights"):
        flags[switch] = flags[switch] or None
    return flags


def params_dtype(args: argparse.Namespace) -> Optional[torch.dtype]:
    return torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else None


@dataclass
class Session:
    device: object  # aquila_npu.device.setup.Device
    loaded: LoadedModel
    tokenizer: object

    @property
    def is_rank0(self) -> bool:
        return torch.distributed.get_rank() == 0


def start(args: argparse.Namespace) -> Session:
    """Tokenizer, device, model-parallel state and this rank's model stage from the parsed flags."""
    check_paths(args)
    # Every input error before any process group exists (all ranks fail alike, nothing hangs).
    _, layout, _ = read_checkpoint(args.load)
    tp = args.tensor_model_parallel_size or layout.tp
    pp = args.pipeline_model_parallel_size or layout.pp
    check_parallel_sizes(args.load, layout, tp, pp)
    check_architecture(layout.spec, layout, architecture_flags(args), args.load)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % (tp * pp):
        raise UsageError(f"{world} process(es) cannot run the tp{tp}-pp{pp} checkpoint {args.load}: start a multiple "
                         f"of {tp * pp} (torchrun --nproc-per-node {tp * pp} ...), or convert it for one process: "
                         f"{relayout_command(args.load, 1, 1)}")
    tokenizer = load_tokenizer(args.tokenizer_name_or_path, use_fast=not args.tokenizer_not_use_fast,
                               tokenizer_type=args.tokenizer_type)
    if vocab_size(tokenizer) > layout.spec.vocab_size:
        raise UsageError(f"--tokenizer-name-or-path {args.tokenizer_name_or_path}: {vocab_size(tokenizer)} tokens, "
                         f"more than the {layout.spec.vocab_size} of the checkpoint's vocabulary: the tokenizer of "
                         "another model")
    try:
        device = setup(args.device, FusedOps.from_args(args))
    except RuntimeError as e:  # the requested device is not usable here
        raise UsageError(str(e)) from None
    loaded = load_model_for_inference(args.load, device, tp=tp, pp=pp, params_dtype=params_dtype(args),
                                      architecture=architecture_flags(args))
    return Session(device=device, loaded=loaded, tokenizer=tokenizer)


def eos_id(tokenizer, spec) -> int:
    """The tokenizer's end-of-sequence id (``</s>`` for Aquila2), else the checkpoint's."""
    tid = getattr(tokenizer, "eos_token_id", None)
    return spec.eos_token_id if tid is None else int(tid)


def pad_id(tokenizer) -> int:
    """Filler for right-padded batches (never attended to by real tokens): pad, else eos, else 0."""
    for tid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    return 0


def print0(*a, **kw) -> None:
    """print on global rank 0 only (or when torch.distributed is not running)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(*a, **kw, flush=True)


def run_main(prog: str, main: Callable[[Optional[List[str]]], int], argv: Optional[List[str]] = None,
             expected: Tuple[type, ...] = ()) -> int:
    """Run ``main``; input errors (ours, and ``expected``) end with one line ``prog: error: ...`` on stderr and
    exit status 1 instead of a traceback."""
    errors = (CheckpointError, UsageError, FusedKernelUnavailable, DataError, PromptTooLong, LayoutError, *expected)
    started_here = not torch.distributed.is_initialized()
    try:
        return main(argv)
    except errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if started_here and torch.distributed.is_initialized():  # only what main() set up
            destroy_model_parallel()
            torch.distributed.destroy_process_group()
