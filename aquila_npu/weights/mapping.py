"""The one weight-mapping table between Hugging Face Aquila2/LLaMA and megatron-core, both directions, any tp/pp.

Each row of ``TABLE`` names a megatron-core parameter, the HF tensors it is made of, how it is packed and how it is
split across tensor-parallel ranks:

* ``replicated``: every TP rank holds the whole tensor (RMSNorm weights);
* ``column``: rows split across TP ranks;
* ``row``: columns split across TP ranks (``linear_proj``, ``linear_fc2``);
* ``vocab``: rows padded to the padded vocabulary (zeros), then split like ``column``;
* ``qkv``: q, k, v packed per query group, ``[q heads of group g | k_g | v_g]`` for each g, then split by groups
  (the layout megatron-core's ``get_query_key_value_tensors`` reads); needs query groups % tp == 0;
* ``wpack``: as ``qkv`` from one HF tensor holding ``[q; k; v]`` rows (Baichuan2's ``W_pack``);
* ``swiglu``: gate and up chunked separately over TP, each rank holding ``[gate shard; up shard]``;
* ``shared``: one tensor, whole on every TP rank, that every HF tensor of the row holds a copy of (the LoRA A of a
  fused linear: q/k/v, or gate/up, share it).

LoRA adapters (``lora_rows``) are rows derived from the table, in HF PEFT's names one way and MindSpeed-LLM's
megatron-core names the other; ``lora_model_key`` is the one place base-checkpoint keys are renamed for a model whose
linears carry adapters (``...linear_qkv.weight`` <-> ``...linear_qkv.base_layer.weight``).

Pipeline stages hold consecutive, equal runs of layers (megatron-core's even split); a stage's state dict numbers
its layers from 0. The first stage owns the embedding, the last the final norm and the output layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from aquila_npu.errors import LayoutError
from aquila_npu.weights.table import (BASE_LAYER, IGNORED_HF_SUFFIXES, LORA_ADAPTER, LORA_PAIRS,  # noqa: F401
                                      LORA_TARGETS, PEFT_PREFIX, TABLE, Row, lora_checkpoint_key, lora_model_key,
                                      lora_target, table_for)
from aquila_npu.models.registry import padded_vocab_size
from aquila_npu.models.registry import ModelSpec


@dataclass(frozen=True)
class Layout:
    """How one model is split: tensor-parallel size, pipeline-parallel size, vocab padding."""

    spec: ModelSpec
    tp: int = 1
    pp: int = 1
    make_vocab_size_divisible_by: int = 1

    def __post_init__(self):
        s = self.spec
        if self.tp < 1 or self.pp < 1:
            raise LayoutError("tensor and pipeline parallel sizes must be >= 1")
        for what, n in (("attention heads", s.num_attention_heads), ("query groups (key/value heads)",
                                                                      s.num_key_value_heads),
                        ("ffn hidden size", s.intermediate_size)):
            if n % self.tp:
                raise LayoutError(f"tensor parallel size {self.tp} does not divide the {n} {what} of {s.name}")
        if s.num_layers % self.pp:
            raise LayoutError(f"pipeline parallel size {self.pp} does not divide the {s.num_layers} layers of {s.name}")
        if s.tie_word_embeddings and self.pp > 1:
            raise LayoutError("tied embeddings with pipeline parallelism are not supported (Aquila2 is untied)")

    @property
    def padded_vocab(self) -> int:
        return padded_vocab_size(self.spec.vocab_size, self.make_vocab_size_divisible_by, self.tp)

    @property
    def layers_per_stage(self) -> int:
        return self.spec.num_layers // self.pp

    def stage_layers(self, pp_rank: int) -> range:
        """Global layer indices held by a pipeline stage."""
        n = self.layers_per_stage
        return range(pp_rank * n, (pp_rank + 1) * n)

    @property
    def table(self) -> Tuple[Row, ...]:
        """The weight table of the model's family (``table_for``)."""
        return table_for(self.spec.family)

    def stage_rows(self, pp_rank: int, table: Optional[Tuple[Row, ...]] = None
                   ) -> Iterator[Tuple[Row, Optional[int], Optional[int]]]:
        """(row, global layer, local layer) for every parameter of a stage, layer by layer (so a reader that holds
        one source stage at a time reads each stage once). ``table``: the family's table (default), or the rows of
        ``lora_rows``."""
        table = self.table if table is None else table
        if pp_rank == 0:
            yield from ((row, None, None) for row in table if row.where == "first")
        for local, i in enumerate(self.stage_layers(pp_rank)):
            yield from ((row, i, local) for row in table if row.where == "layer")
        if pp_rank == self.pp - 1:
            yield from ((row, None, None) for row in table if row.where == "last")

    def stage_of_layer(self, i: int) -> int:
        return i // self.layers_per_stage


def _fmt(name: str, i: Optional[int]) -> str:
    return name if i is None else name.format(i=i)


# ----------------------------------------------------------------------------------------------------------------
# HF -> megatron-core
# ----------------------------------------------------------------------------------------------------------------


def split_for_tp(row: Row, hf: List[Tensor], layout: Layout) -> List[Tensor]:
    """One megatron-core tensor per TP rank, from the row's HF tensors."""
    return [rank_slice(row, hf, layout, r) for r in range(layout.tp)]


def _shape(t) -> Tuple[int, ...]:
    return tuple(t.shape) if isinstance(t, Tensor) else tuple(t.get_shape())


def rank_slice(row: Row, hf: list, layout: Layout, r: int) -> Tensor:
    """TP rank ``r``'s megatron-core tensor of a row, reading only the rows/columns it needs.

    ``hf`` holds full tensors or lazy slices (anything indexable as ``t[a:b]`` / ``t[:, a:b]`` returning a tensor,
    e.g. safetensors' ``get_slice``), so a converter holds one rank's shard in memory, not a whole stage.
    The inverse of ``merge_from_tp`` (round trip tested bit for bit).
    """
    tp, spec = layout.tp, layout.spec
    if row.kind in ("replicated", "shared"):
        return hf[0][:]
    if row.kind in ("column", "swiglu"):
        n = _shape(hf[0])[0] // tp
        parts = [t[r * n:(r + 1) * n] for t in hf]
        return torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    if row.kind == "row":
        n = _shape(hf[0])[1] // tp
        return hf[0][:, r * n:(r + 1) * n]
    if row.kind == "vocab":
        v, h = _shape(hf[0])
        if v > layout.padded_vocab:
            raise LayoutError(f"vocab tensor has {v} rows, more than the padded vocab {layout.padded_vocab}")
        n = layout.padded_vocab // tp
        a, b = r * n, (r + 1) * n
        real = hf[0][min(a, v):min(b, v)]  # possibly 0 rows: keeps the dtype
        pad = b - max(a, v)
        return real if pad <= 0 else torch.cat((real, real.new_zeros(pad, h)), dim=0)
    if row.kind in ("qkv", "wpack"):
        d, ng = spec.head_dim, spec.num_key_value_heads
        per, groups = spec.num_attention_heads // ng, ng // tp
        if row.kind == "qkv":
            (q, q0), (k, k0), (v, v0) = ((t, 0) for t in hf)
        else:  # one tensor [q; k; v]: each part read at its row offset
            nq = spec.num_attention_heads * d
            (q, q0), (k, k0), (v, v0) = (hf[0], 0), (hf[0], nq), (hf[0], nq + ng * d)
        parts = []
        for g in range(r * groups, (r + 1) * groups):
            parts += [q[q0 + g * per * d:q0 + (g + 1) * per * d], k[k0 + g * d:k0 + (g + 1) * d],
                      v[v0 + g * d:v0 + (g + 1) * d]]
        return torch.cat(parts, dim=0)
    raise ValueError(f"unknown row kind {row.kind}")


def hf_rank_to_mcore(get_hf: Callable[[str], object], layout: Layout, pp_rank: int, tp_rank: int,
                     cast: Optional[Callable[[Tensor], Tensor]] = None, table: Optional[Tuple[Row, ...]] = None
                     ) -> Dict[str, Tensor]:
    """One (pipeline stage, TP rank) megatron-core state dict; ``get_hf`` may return lazy slices."""
    out: Dict[str, Tensor] = {}
    for row, i, local in layout.stage_rows(pp_rank, table):
        sources = [get_hf(_fmt(name, i)) for name in row.hf]
        t = rank_slice(row, sources, layout, tp_rank)
        t = cast(t) if cast is not None else t
        # Copy where the result is a view of a bigger (possibly memory-mapped) tensor; concatenations are fresh.
        if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        out[_fmt(row.mcore, local)] = t
    return out


def hf_stage_to_mcore(get_hf: Callable[[str], Tensor], layout: Layout, pp_rank: int) -> List[Dict[str, Tensor]]:
    """The megatron-core state dicts (one per TP rank) of one pipeline stage, reading HF tensors by name.

    The returned tensors are contiguous copies: they share no memory with the HF tensors (which may be mmapped).
    """
    return [hf_rank_to_mcore(get_hf, layout, pp_rank, r) for r in range(layout.tp)]


# ----------------------------------------------------------------------------------------------------------------
# megatron-core -> HF
# ----------------------------------------------------------------------------------------------------------------


def merge_from_tp(row: Row, parts: List[Tensor], layout: Layout) -> List[Tensor]:
    """The row's HF tensors, from the TP ranks' megatron-core tensors."""
    spec = layout.spec
    if row.kind == "replicated":
        return [parts[0]]
    if row.kind == "shared":
        return [parts[0]] * len(row.hf)
    if row.kind == "column":
        return [torch.cat(parts, dim=0)]
    if row.kind == "row":
        return [torch.cat(parts, dim=1)]
    if row.kind == "vocab":
        return [torch.cat(parts, dim=0)[: spec.vocab_size]]
    if row.kind in ("qkv", "wpack"):
        d, ng = spec.head_dim, spec.num_key_value_heads
        per = spec.num_attention_heads // ng
        full = torch.cat(parts, dim=0)
        h = full.shape[-1]
        grouped = full.reshape(ng, (per + 2) * d, h)
        q, k, v = grouped.split([per * d, d, d], dim=1)
        q, k, v = q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)
        return [q, k, v] if row.kind == "qkv" else [torch.cat([q, k, v], dim=0)]
    if row.kind == "swiglu":
        halves = [p.chunk(2, dim=0) for p in parts]
        return [torch.cat([g for g, _ in halves], dim=0), torch.cat([u for _, u in halves], dim=0)]
    raise ValueError(f"unknown row kind {row.kind}")


def mcore_stage_to_hf(shards: List[Dict[str, Tensor]], layout: Layout, pp_rank: int,
                      table: Optional[Tuple[Row, ...]] = None) -> Iterator[Tuple[str, Tensor]]:
    """(HF name, tensor) for every HF tensor of one stage, from its TP ranks' state dicts."""
    if len(shards) != layout.tp:
        raise LayoutError(f"stage {pp_rank} has {len(shards)} tensor-parallel shards, expected {layout.tp}")
    for row, i, local in layout.stage_rows(pp_rank, table):
        key = _fmt(row.mcore, local)
        missing = [r for r, sd in enumerate(shards) if key not in sd]
        if missing:
            raise KeyError(f"{key} missing from tensor-parallel rank(s) {missing} of pipeline stage {pp_rank}")
        for name, t in zip(row.hf, merge_from_tp(row, [sd[key] for sd in shards], layout)):
            yield _fmt(name, i), t.contiguous()


def hf_names(spec: ModelSpec) -> List[str]:
    """Every HF tensor name of the model, in table order."""
    layout = Layout(spec)
    return [_fmt(name, i) for row, i, _ in layout.stage_rows(0) for name in row.hf]


def hf_shapes(spec: ModelSpec) -> Dict[str, Tuple[int, ...]]:
    """The shape of every HF tensor of the model, in table order (``hf_names`` order)."""
    h, f, v, d = spec.hidden_size, spec.intermediate_size, spec.vocab_size, spec.head_dim
    by_suffix = {"embed_tokens": (v, h), "lm_head": (v, h), "q_proj": (spec.num_attention_heads * d, h),
                 "k_proj": (spec.num_key_value_heads * d, h), "v_proj": (spec.num_key_value_heads * d, h),
                 "W_pack": ((spec.num_attention_heads + 2 * spec.num_key_value_heads) * d, h),
                 "o_proj": (h, spec.num_attention_heads * d), "gate_proj": (f, h), "up_proj": (f, h),
                 "down_proj": (h, f)}
    return {name: by_suffix.get(name.split(".")[-2], (h,)) for name in hf_names(spec)}


def mcore_param_names(layout: Layout, pp_rank: int) -> List[str]:
    return [_fmt(row.mcore, local) for row, _, local in layout.stage_rows(pp_rank)]


def lora_rows(targets=LORA_TARGETS) -> Tuple[Row, ...]:
    """Two rows per targeted linear: its LoRA A ([r, in]) then B ([out, r]).

    Tensor parallelism follows the base weight: a column-parallel linear (qkv, fc1) has A whole on every rank
    (``shared``: the q/k/v or gate/up HF modules all hold that one A) and B split by output rows exactly as the
    weight (``qkv`` per query group, ``swiglu``); a row-parallel linear (proj, fc2) has A split by input columns
    (``row``) and B whole (``replicated``).
    """
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown:
        raise LayoutError(f"LoRA target(s) {', '.join(unknown)}: choose from {' '.join(LORA_TARGETS)}")
    return tuple(r for t in LORA_TARGETS if t in targets for r in LORA_PAIRS[t])
