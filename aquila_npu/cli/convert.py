"""``tools/checkpoint/convert_ckpt.py`` (also ``aquila-convert``): convert Aquila2 weights between Hugging Face
folders and Megatron checkpoint directories, any tensor/pipeline layout, with ModelLink's flags. The conversion
itself: ``aquila_npu.checkpoint.convert``."""

from __future__ import annotations

import argparse
import os
import sys

from aquila_npu.cli.common import Parser, run_cli
from aquila_npu.errors import CheckpointError, UsageError
from aquila_npu.flags import add_inert_arguments, check_positive
from aquila_npu.lora import settings as lora_settings

PROG = "convert_ckpt.py"
INERT = ("--model-type", "--saver", "--lora-ckpt-filter")


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="Convert Aquila2 weights between Hugging Face folders and Megatron checkpoint directories "
                    "(any tensor/pipeline-parallel layout), tensor by tensor, one pipeline stage in memory at a time.")
    p.add_argument("--loader", required=True, choices=["llama2_hf", "hf", "megatron", "mcore", "peft"],
                   help="input format: llama2_hf / hf (a Hugging Face folder), megatron / mcore, or peft (a Hugging "
                        "Face PEFT LoRA adapter folder, written as an adapter checkpoint for --base-dir)")
    p.add_argument("--save-model-type", default=None, choices=["save_huggingface_llama", "megatron"],
                   help="save_huggingface_llama: write a Hugging Face model into <save-dir>/mg2hg/, taking config "
                        "and tokenizer files from <save-dir> (the original HF folder)")
    p.add_argument("--load-dir", required=True, help="input HF folder or Megatron checkpoint directory")
    p.add_argument("--save-dir", required=True, help="output directory (replaced atomically at the end)")
    p.add_argument("--target-tensor-parallel-size", type=int, default=None,
                   help="output tensor-parallel size (default 1; with --loader peft: the --base-dir checkpoint's)")
    p.add_argument("--target-pipeline-parallel-size", type=int, default=None,
                   help="output pipeline-parallel size (default 1; with --loader peft: the --base-dir checkpoint's)")
    p.add_argument("--tokenizer-model", default=None,
                   help="tokenizer file (tokenizer.json / tokenizer.model); checked to exist, its vocab must cover the "
                        "model's")
    p.add_argument("--params-dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="cast weights to this dtype (default: keep the input's)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                   help="pad the vocabulary to a multiple of this x tp (default 1, as ModelLink's Aquila2 scripts)")
    p.add_argument("--max-shard-size-gb", type=float, default=5.0, help="HF output: largest safetensors shard")
    lora_settings.add_arguments(p, lora_settings.CONVERSION)
    add_inert_arguments(p, INERT)
    g = p.add_argument_group("LoRA conversion (MindSpeed-LLM's convert_ckpt flags)")
    g.add_argument("--save-lora-to-hf", action="store_true",
                   help="write the adapter checkpoint (--lora-load, else --load-dir) as a Hugging Face PEFT adapter "
                        "into --save-dir: adapter_model.safetensors + adapter_config.json (q_proj ... down_proj)")
    g.add_argument("--base-dir", default=None, metavar="DIR",
                   help="with --loader peft: the base model the adapter belongs to (a Megatron checkpoint: its "
                        "tp/pp; or a Hugging Face folder)")
    g.add_argument("--qlora-nf4", action="store_true",
                   help="write the base of a QLoRA run (MindSpeed-LLM's flag): every decoder linear as "
                        "bitsandbytes' NF4 with double quantisation (blocksize 64), each Hugging Face linear quantised "
                        "once and cut into tensor-parallel shards; needs bitsandbytes (pip install "
                        "'aquila_npu[qlora]')")
    return p


def parse(argv=None) -> argparse.Namespace:
    args = parser().parse_args(argv)
    check_positive(args, "target_tensor_parallel_size", "target_pipeline_parallel_size",
                   "make_vocab_size_divisible_by")
    if not args.max_shard_size_gb > 0:
        raise UsageError(f"--max-shard-size-gb {args.max_shard_size_gb} must be > 0")
    for flag in ("load_dir", "lora_load", "base_dir"):  # before torch is imported
        path = getattr(args, flag)
        if path and not os.path.exists(path):
            raise CheckpointError(f"--{flag.replace('_', '-')} {path}: no such file or folder")
    if args.tokenizer_model and not os.path.exists(args.tokenizer_model):
        raise CheckpointError(f"--tokenizer-model {args.tokenizer_model}: no such file")
    if args.qlora_nf4:
        _check_qlora_nf4(args)
    return args


def _check_qlora_nf4(args) -> None:
    """--qlora-nf4 writes a Megatron base from full-precision weights, with bitsandbytes."""
    if args.save_model_type == "save_huggingface_llama" or args.save_lora_to_hf or args.loader == "peft":
        raise UsageError("--qlora-nf4 writes the 4-bit base of a QLoRA run as a Megatron checkpoint: drop "
                         "--save-model-type save_huggingface_llama / --save-lora-to-hf / --loader peft")
    if args.lora_load:
        raise UsageError("--qlora-nf4 with --lora-load: merge the adapter first (without --qlora-nf4), then "
                         "quantise the merged weights")
    from aquila_npu.weights.nf4 import require_bitsandbytes

    require_bitsandbytes("--qlora-nf4")


def main(argv=None) -> int:
    return run_cli(PROG, parse, "aquila_npu.jobs.convert:run", argv)


if __name__ == "__main__":
    sys.exit(main())
