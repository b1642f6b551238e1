"""``tools/checkpoint/convert_ckpt.py``: Hugging Face <-> Megatron checkpoints in any tp/pp (``checkpoint.convert``),
LoRA adapters merged on the way (``--lora-load``), Hugging Face PEFT adapters in and out (``lora.convert``)."""

from __future__ import annotations

import os
import time

from aquila_npu.checkpoint.convert import to_huggingface, to_megatron
from aquila_npu.checkpoint.flagai_io import open_hf_folder
from aquila_npu.checkpoint.megatron_io import MegatronReader
from aquila_npu.errors import CheckpointError, UsageError
from aquila_npu.flags import inert_note
from aquila_npu.lora import convert as lora_convert
from aquila_npu.lora import settings as lora_settings
from aquila_npu.lora.checkpoint import AdapterCheckpoint
from aquila_npu.models.dtypes import DTYPES


def run(args) -> int:
    start = time.time()
    out = convert(args)
    print(f"converted {args.load_dir} -> {out} in {time.time() - start:.1f}s{inert_note(args)}")
    return 0


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


def convert(args) -> str:
    """Convert as the flags say; the output folder."""
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
        reader = open_hf_folder(args.load_dir) if hf_in else MegatronReader(args.load_dir)
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
    if args.qlora_nf4 and getattr(getattr(reader, "info", None), "is_nf4", False):
        raise CheckpointError(f"--load-dir {args.load_dir} is already an NF4 base: convert the Hugging Face (or "
                              "bf16 / fp32 Megatron) weights with --qlora-nf4 for another layout")
    to_megatron(reader, args.save_dir, args.target_tensor_parallel_size or 1, args.target_pipeline_parallel_size or 1,
                args.make_vocab_size_divisible_by or 1, dtype, qlora_nf4=args.qlora_nf4)
    return args.save_dir
