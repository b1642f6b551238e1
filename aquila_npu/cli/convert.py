"""``tools/checkpoint/convert_ckpt.py`` (also ``aquila-convert``): convert Aquila2 weights between Hugging Face
folders and Megatron checkpoint directories, any tensor/pipeline layout, with ModelLink's flags. The conversion
itself: ``aquila_npu.checkpoint.convert``."""

from __future__ import annotations

import argparse
import os
import sys
import time

from aquila_npu.checkpoint.convert import to_huggingface, to_megatron
from aquila_npu.checkpoint.hf_io import HFReader
from aquila_npu.checkpoint.megatron_io import MegatronReader
from aquila_npu.cli.common import check_positive, run_cli
from aquila_npu.errors import CheckpointError, UsageError
from aquila_npu.lora import convert as lora_convert
from aquila_npu.lora import settings as lora_settings
from aquila_npu.lora.checkpoint import AdapterCheckpoint
from aquila_npu.models.dtypes import DTYPES

PROG = "convert_ckpt.py"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Convert Aquila2 weights between Hugging Face folders and Megatron checkpoint directories "
                    "(any tensor/pipeline-parallel layout), tensor by tensor, one pipeline stage in memory at a time.")
    p.add_argument("--model-type", default="GPT", choices=["GPT"], help="model family (only GPT; kept for ModelLink)")
    p.add_argument("--loader", required=True, choices=["llama2_hf", "hf", "megatron", "mcore", "peft"],
                   help="input format: llama2_hf / hf (a Hugging Face folder), megatron / mcore, or peft (a Hugging "
                        "Face PEFT LoRA adapter folder, written as an adapter checkpoint for --base-dir)")
    p.add_argument("--saver", required=True, choices=["megatron", "mcore"],
                   help="output writer (megatron; with --save-model-type save_huggingface_llama it writes HF)")
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
    lora_settings.add_arguments(p)
    g = p.add_argument_group("LoRA conversion (MindSpeed-LLM's convert_ckpt flags)")
    g.add_argument("--save-lora-to-hf", action="store_true",
                   help="write the adapter checkpoint (--lora-load, else --load-dir) as a Hugging Face PEFT adapter "
                        "into --save-dir: adapter_model.safetensors + adapter_config.json (q_proj ... down_proj)")
    g.add_argument("--base-dir", default=None, metavar="DIR",
                   help="with --loader peft: the base model the adapter belongs to (a Megatron checkpoint: its "
                        "tp/pp; or a Hugging Face folder)")
    return p


def _check_tokenizer(path: str, vocab_size: int) -> None:
    if not os.path.exists(path):
        raise CheckpointError(f"--tokenizer-model {path}: no such file")
    if path.endswith(".json"):
        from tokenizers import Tokenizer
        try:
            n = Tokenizer.from_file(path).get_vocab_size(with_added_tokens=True)
        except Exception as e:
            raise CheckpointError(f"--tokenizer-model {path}: cannot read ({e})") from None
        if n > vocab_size:
            raise CheckpointError(f"--tokenizer-model {path}: {n} tokens, more than the model's vocab {vocab_size}")


def _lora(args) -> str:
    """The LoRA conversions: a PEFT adapter in (--loader peft), a PEFT adapter out (--save-lora-to-hf)."""
    if args.loader == "peft":
        if not args.base_dir:
            raise UsageError("--loader peft needs --base-dir: the base model the adapter belongs to")
        layout = lora_convert.layout_of_base(args.base_dir, tp=args.target_tensor_parallel_size,
                                             pp=args.target_pipeline_parallel_size,
                                             make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
        lora_convert.import_peft(args.load_dir, args.save_dir, layout)
        return args.save_dir
    adapter = args.lora_load or args.load_dir
    lora_settings.resolve(args, AdapterCheckpoint(adapter).settings)  # given LoRA flags must be the adapter's
    return lora_convert.export_peft(adapter, args.save_dir)


def run(args) -> str:
    check_positive(args, "target_tensor_parallel_size", "target_pipeline_parallel_size",
                   "make_vocab_size_divisible_by")
    if not args.max_shard_size_gb > 0:
        raise UsageError(f"--max-shard-size-gb {args.max_shard_size_gb} must be > 0")
    if args.loader == "peft" or args.save_lora_to_hf:
        return _lora(args)
    dtype = DTYPES[args.params_dtype] if args.params_dtype else None
    hf_in = args.loader in ("llama2_hf", "hf")
    if args.lora_load and hf_in:
        raise UsageError("--lora-load merges an adapter into a Megatron base: use --loader megatron")
    if args.lora_load:  # W + alpha/r * B A per tensor-parallel shard, before anything is gathered
        lora_settings.resolve(args, AdapterCheckpoint(args.lora_load).settings)
        reader = lora_convert.LoraMergedReader(args.load_dir, args.lora_load)
    else:
        reader = HFReader(args.load_dir) if hf_in else MegatronReader(args.load_dir)
    if args.tokenizer_model:
        _check_tokenizer(args.tokenizer_model, reader.spec.vocab_size)
    if args.save_model_type == "save_huggingface_llama":
        if hf_in:
            raise CheckpointError("--save-model-type save_huggingface_llama needs --loader megatron")
        out = os.path.join(args.save_dir, "mg2hg")
        files = args.save_dir if os.path.isdir(args.save_dir) else None
        to_huggingface(reader, out, hf_dir_for_files=files, params_dtype=dtype,
                       max_shard_bytes=int(args.max_shard_size_gb * 1024 ** 3))
        return out
    to_megatron(reader, args.save_dir, args.target_tensor_parallel_size or 1, args.target_pipeline_parallel_size or 1,
                args.make_vocab_size_divisible_by or 1, dtype)
    return args.save_dir


def _main(argv=None) -> int:
    args = parser().parse_args(argv)
    start = time.time()
    out = run(args)
    print(f"converted {args.load_dir} -> {out} in {time.time() - start:.1f}s")
    return 0


def main(argv=None) -> int:
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
