"""The model a training run builds: from the checkpoint (--load), the registry (--model) or the flags, checked for
contradictions between them."""

from __future__ import annotations

from typing import Optional, Tuple

from aquila_npu.checkpoint.load_model import ARCH_FLAGS, check_architecture

from aquila_npu.errors import ArchitectureMismatch, UsageError
from aquila_npu.models.registry import MODELS, ModelSpec, get_model_spec
from aquila_npu.weights.mapping import Layout


def _same_architecture(a: ModelSpec, b: ModelSpec) -> bool:
    keep = ("hidden_size", "intermediate_size", "num_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "rms_norm_eps", "rope_theta", "tie_word_embeddings")
    return all(getattr(a, k) == getattr(b, k) for k in keep)


def resolve(args, checkpoint: Optional[dict] = None, tokenizer_vocab: Optional[int] = None
            ) -> Tuple[ModelSpec, int]:
    """(spec, make_vocab_size_divisible_by). ``checkpoint`` is the ``aquila`` entry of a checkpoint being loaded."""
    base, where, source = None, None, None
    if args.model:
        if args.model not in MODELS:
            raise UsageError(f"--model {args.model}: unknown; known: {', '.join(sorted(MODELS))}")
        base, where = get_model_spec(args.model), f"--model {args.model}"
        source = where
    if checkpoint is not None:
        ck = ModelSpec(**checkpoint["spec"])
        if base is not None and not _same_architecture(base, ck):
            raise UsageError(f"--model {args.model} does not match the architecture of the --load checkpoint "
                                f"{args.load} ({ck.name})")
        base, where, source = ck, args.load, "checkpoint"
    given = {flag: getattr(args, flag) for flag in ARCH_FLAGS if getattr(args, flag) is not None}
    if base is not None:
        try:
            check_architecture(base, Layout(base), given, load_dir=where if source == "checkpoint" else "",
                               source=source)
        except ArchitectureMismatch as e:
            raise UsageError(str(e)) from None
        spec = base
    else:
        missing = [f for f in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads")
                   if f not in given]
        if missing:
            raise UsageError("no architecture: give --model NAME, --load a checkpoint, or the flags "
                                + ", ".join("--" + m.replace("_", "-") for m in missing))
        vocab = given.get("vocab_size", tokenizer_vocab)
        if vocab is None:
            raise UsageError("a model built from flags takes its vocabulary size from --vocab-size or "
                                "--tokenizer-name-or-path")
        heads = given["num_attention_heads"]
        spec = ModelSpec(
            name="custom", hidden_size=given["hidden_size"], intermediate_size=given["ffn_hidden_size"],
            num_layers=given["num_layers"], num_attention_heads=heads,
            num_key_value_heads=given.get("num_query_groups", heads), vocab_size=vocab,
            max_position_embeddings=given.get("max_position_embeddings") or args.seq_length or 2048,
            rms_norm_eps=given.get("norm_epsilon", 1e-5), rope_theta=float(given.get("rotary_base", 10000.0)),
            torch_dtype="bfloat16" if args.bf16 else "float16" if args.fp16 else "float32", source="flags")
    if tokenizer_vocab is not None and tokenizer_vocab > spec.vocab_size:
        raise UsageError(f"--tokenizer-name-or-path {args.tokenizer_name_or_path} has {tokenizer_vocab} tokens, "
                            f"more than the model's vocabulary ({spec.vocab_size})")
    if args.seq_length is None:
        args.seq_length = spec.max_position_embeddings
    if args.seq_length > spec.max_position_embeddings:
        raise UsageError(f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
                            f"{spec.max_position_embeddings}")
    divisible = args.make_vocab_size_divisible_by
    if checkpoint is not None:
        if divisible is not None and divisible != checkpoint["make_vocab_size_divisible_by"]:
            raise UsageError(f"--make-vocab-size-divisible-by {divisible} contradicts the --load checkpoint's "
                                f"{checkpoint['make_vocab_size_divisible_by']}")
        divisible = checkpoint["make_vocab_size_divisible_by"]
    return spec, divisible or 1
