"""The architecture flags users pass (Megatron-LM / ModelLink spellings) and the ``ModelSpec`` fields they stand for.

One table, ``ARCH_FLAGS``, makes the parser group (``add_arguments``), the flags of a spec (``to_argv``), the spec of
flags (``spec_from_flags``), the check of given flags against a checkpoint or the registry (``check``), the ``args``
namespace stored in Megatron checkpoints (``megatron_namespace``) and the comparison of two architectures
(``same_architecture``). No torch or megatron-core import: the converter uses it too.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional

from aquila_npu.errors import ArchitectureMismatch, UsageError
from aquila_npu.models.registry import ModelSpec, padded_vocab_size


@dataclass(frozen=True)
class ArchFlag:
    dest: str  # argparse dest (Megatron-LM's name)
    field: str  # the ModelSpec field it sets
    type: type
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")


ARCH_FLAGS = (
    ArchFlag("num_layers", "num_layers", int, "transformer layers"),
    ArchFlag("hidden_size", "hidden_size", int, "hidden size"),
    ArchFlag("ffn_hidden_size", "intermediate_size", int, "SwiGLU MLP intermediate size"),
    ArchFlag("num_attention_heads", "num_attention_heads", int, "query heads"),
    ArchFlag("num_query_groups", "num_key_value_heads", int, "key/value heads (with --group-query-attention)"),
    ArchFlag("max_position_embeddings", "max_position_embeddings", int, "maximum positions (RoPE)"),
    ArchFlag("norm_epsilon", "rms_norm_eps", float, "RMSNorm epsilon"),
    ArchFlag("rotary_base", "rope_theta", float, "RoPE theta (default 10000)"),
    ArchFlag("vocab_size", "vocab_size", int,
             "vocabulary size (unpadded); a model built from the flags takes the tokenizer's when not given"),
)
_BY_DEST = {f.dest: f for f in ARCH_FLAGS}
# Besides the flag fields, what makes two specs the same model (names, sources and token ids do not).
_IDENTITY = tuple(f.field for f in ARCH_FLAGS) + ("tie_word_embeddings", "rope_scaling_factor", "family",
                                                  "position_embedding", "output_layer")


def add_arguments(parser: argparse.ArgumentParser, title: str):
    """The architecture group: every flag defaults to None (= not given)."""
    g = parser.add_argument_group(title)
    for f in ARCH_FLAGS:
        g.add_argument(f.flag, dest=f.dest, type=f.type, default=None, help=f.help)
    g.add_argument("--group-query-attention", action="store_true",
                   help="grouped-query attention: --num-query-groups key/value heads")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="separate input embedding and output layer (Aquila2 has them untied)")
    g.add_argument("--position-embedding-type", choices=["rope", "alibi"], default=None,
                   help="rope (Aquila2, Baichuan2-7B) or alibi (Baichuan2-13B); checked against the model's")
    g.add_argument("--normalization", choices=["RMSNorm"], default=None, help="RMSNorm (the only one)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                   help="pad the vocabulary to a multiple of this x tp (default 1, as ModelLink's Aquila2 scripts; a "
                        "checkpoint's own value when loading one)")
    return g


def given(args: argparse.Namespace) -> Dict[str, object]:
    """The architecture flags given on the command line (dest -> value), switches only when set."""
    out = {f.dest: getattr(args, f.dest, None) for f in ARCH_FLAGS}
    out = {k: v for k, v in out.items() if v is not None}
    for switch in ("group_query_attention", "untie_embeddings_and_output_weights"):
        if getattr(args, switch, False):
            out[switch] = True
    for name in ("position_embedding_type", "normalization", "make_vocab_size_divisible_by"):
        if getattr(args, name, None) is not None:
            out[name] = getattr(args, name)
    return out


def validate(flags: Mapping[str, object]) -> None:
    """Contradictions among the flags themselves."""
    if flags.get("group_query_attention") and "num_query_groups" not in flags:
        raise UsageError("--group-query-attention needs --num-query-groups")
    if "num_query_groups" in flags and not flags.get("group_query_attention"):
        raise UsageError("--num-query-groups needs --group-query-attention")
    for dest in [f.dest for f in ARCH_FLAGS if f.type is int] + ["make_vocab_size_divisible_by"]:
        if dest in flags and int(flags[dest]) < 1:
            raise UsageError(f"--{dest.replace('_', '-')} {flags[dest]} must be >= 1")


def to_argv(spec: ModelSpec) -> List[str]:
    """The flags that build ``spec`` (what a ModelLink script passes)."""
    argv: List[str] = []
    for f in ARCH_FLAGS:
        if f.dest == "num_query_groups" and spec.num_key_value_heads == spec.num_attention_heads:
            continue
        argv += [f.flag, str(getattr(spec, f.field))]
    if spec.num_key_value_heads != spec.num_attention_heads:
        argv.append("--group-query-attention")
    if not spec.tie_word_embeddings:
        argv.append("--untie-embeddings-and-output-weights")
    return argv


def spec_from_flags(flags: Mapping[str, object], *, vocab_size: Optional[int], default_positions: int,
                    torch_dtype: str) -> ModelSpec:
    """A spec built from the flags alone (no registry name, no checkpoint)."""
    missing = [d for d in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads") if d not in flags]
    if missing:
        raise UsageError("no architecture: give --model NAME, --load a checkpoint, or the flags "
                         + ", ".join(_BY_DEST[m].flag for m in missing))
    vocab = flags.get("vocab_size", vocab_size)
    if vocab is None:
        raise UsageError("a model built from flags takes its vocabulary size from --vocab-size or "
                         "--tokenizer-name-or-path")
    values = {_BY_DEST[d].field: _BY_DEST[d].type(v) for d, v in flags.items() if d in _BY_DEST}
    values.update(vocab_size=vocab, max_position_embeddings=values.get("max_position_embeddings", default_positions))
    values.setdefault("num_key_value_heads", values["num_attention_heads"])
    if flags.get("position_embedding_type"):
        values["position_embedding"] = flags["position_embedding_type"]
    return ModelSpec(name="custom", torch_dtype=torch_dtype, source="flags", **values)


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-6)
    return a == b


def check(spec: ModelSpec, flags: Mapping[str, object], source: str, *, where: str = "",
          padded_vocab: Optional[int] = None, tp: int = 1) -> None:
    """Given flags against ``spec`` (from ``source``: 'checkpoint', '--model aquila2-7b'); ``padded_vocab`` (the
    checkpoint's) checks --make-vocab-size-divisible-by. Raises ArchitectureMismatch listing every disagreement."""
    bad = []
    for f in ARCH_FLAGS:
        if f.dest in flags and not _same(f.type(flags[f.dest]), getattr(spec, f.field)):
            bad.append(f"{f.flag} {flags[f.dest]} ({source}: {getattr(spec, f.field)})")
    if flags.get("group_query_attention") and "num_query_groups" not in flags \
            and spec.num_key_value_heads == spec.num_attention_heads:
        bad.append(f"--group-query-attention (set) ({source}: no GQA, {spec.num_key_value_heads} key/value heads)")
    if flags.get("untie_embeddings_and_output_weights") and spec.tie_word_embeddings:
        bad.append(f"--untie-embeddings-and-output-weights (set) ({source}: tied embeddings)")
    position = flags.get("position_embedding_type")
    if position is not None and position != spec.position_embedding:
        bad.append(f"--position-embedding-type {position} ({source}: {spec.position_embedding})")
    divisible = flags.get("make_vocab_size_divisible_by")
    if divisible is not None and padded_vocab is not None:
        padded = padded_vocab_size(spec.vocab_size, int(divisible), tp)
        if padded != padded_vocab:
            bad.append(f"--make-vocab-size-divisible-by {divisible} ({source}: vocab {spec.vocab_size} padded to "
                       f"{padded_vocab}, the flag pads it to {padded})")
    if bad:
        raise ArchitectureMismatch(f"{where or 'the ' + source}: architecture flags disagree with the {source}: "
                                   + "; ".join(bad) + f". Drop them (the architecture is read from the {source}) "
                                   f"or use the {source} they describe.")


def same_architecture(a: ModelSpec, b: ModelSpec) -> bool:
    """Whether two specs describe the same model (the table's fields, tied embeddings, RoPE scaling)."""
    return not differences(a, b)


def differences(a: ModelSpec, b: ModelSpec) -> list:
    """``["hidden_size 64 vs 128", ...]``: the fields in which two specs differ (those ``same_architecture``
    compares)."""
    return [f"{k} {getattr(a, k)} vs {getattr(b, k)}" for k in _IDENTITY if not _same(getattr(a, k), getattr(b, k))]


def megatron_namespace(spec: ModelSpec, **layout) -> argparse.Namespace:
    """The ``args`` Megatron-LM stores in a checkpoint: every flag of the table plus the switches and ``layout``
    (tensor/pipeline sizes, vocabulary padding, dtype flags)."""
    values = {f.dest: getattr(spec, f.field) for f in ARCH_FLAGS}
    values.update(group_query_attention=spec.num_key_value_heads != spec.num_attention_heads,
                  untie_embeddings_and_output_weights=not spec.tie_word_embeddings,
                  position_embedding_type=spec.position_embedding,
                  normalization="RMSNorm", swiglu=True, add_bias_linear=False, seq_length=spec.max_position_embeddings)
    values.update(layout)
    return argparse.Namespace(**values)
