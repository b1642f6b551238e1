"""Adapter conversions, through the weight-mapping table's LoRA rows (``mapping.lora_rows``).

* ``LoraMergedReader(base_dir, adapter_dir)``: a ``MegatronReader`` whose shards are ``W + alpha/r * B A``, merged per
  tensor-parallel shard before the table gathers them; ``checkpoint.convert.to_huggingface`` / ``to_megatron`` write
  it as Hugging Face weights or any other Megatron layout (MindSpeed-LLM's ``convert_ckpt.py --lora-load``).
* ``export_peft(adapter_dir, save_dir)``: a Hugging Face PEFT adapter (``adapter_model.safetensors`` +
  ``adapter_config.json``, module names q_proj ... down_proj) that ``PeftModel.from_pretrained`` loads
  (MindSpeed-LLM's ``--save-lora-to-hf``). A fused linear's adapter is split exactly: q, k and v (per query group, as
  the base weight) share the A of ``linear_qkv`` and take their rows of its B; gate and up likewise for ``linear_fc1``.
* ``import_peft(peft_dir, save_dir, layout)``: the reverse, e.g. Aquila2's own ``finetune_lora.sh`` output.

Importing separate q/k/v (or gate/up) adapters into one fused linear: their updates ``B_q A_q``, ``B_k A_k``,
``B_v A_v`` stack into the fused weight's update, which one rank-r pair (B, A) can represent only when the A's are
equal. When they are (our own exports), the fused adapter has that A and rank r. When they are not (a PEFT adapter
trained on q_proj and v_proj, the usual case) the fused adapter is block-structured, exact for any A's:
``A = [A_q; A_v]`` (rank r_q + r_v) and each module's rows of B are ``[B_q, 0]`` / ``[0, B_v]`` (a module without an
adapter, k here, has zero rows), with alpha scaled by the same factor so alpha / r is unchanged. Training then continues
in that larger space (the zero blocks become trainable), and exporting gives q/k/v adapters of the larger rank sharing
A, which PEFT loads with ``rank_pattern`` / ``alpha_pattern``.
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from aquila_npu.checkpoint import megatron_io, safe_load
from aquila_npu.errors import CheckpointError
from aquila_npu.lora import checkpoint as adapter_ckpt
from aquila_npu.lora.settings import LoraSettings
from aquila_npu.models.hf_config import spec_from_hf_config
from aquila_npu.models.registry import ModelSpec
from aquila_npu.outputs.atomic import AtomicDir
from aquila_npu.weights.mapping import (LORA_PAIRS, PEFT_PREFIX, TABLE, Layout, hf_rank_to_mcore, hf_shapes,
                                        lora_rows, lora_target)

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's names (peft.utils.constants)
ADAPTER_PICKLE = "adapter_model.bin"
ADAPTER_CONFIG = "adapter_config.json"


def _fmt(name: str, i: int) -> str:
    return name.format(i=i)


# ----------------------------------------------------------------------------------------------------------------
# merge
# ----------------------------------------------------------------------------------------------------------------


def merge_shard(base: Dict[str, Tensor], adapter: Dict[str, Tensor], settings: LoraSettings,
                dtype: Optional[torch.dtype] = None) -> Dict[str, Tensor]:
    """One (stage, TP rank) state dict with every adapted weight replaced by ``W + alpha/r * B A`` (computed in fp32,
    as peft's merge, and cast to ``dtype``, default W's). Column-parallel linears: B's row shard times the whole A
    gives W's row shard; row-parallel: the whole B times A's column shard gives W's column shard."""
    out = dict(base)
    for key_a, a in adapter.items():
        if ".lora_A." not in key_a:
            continue
        prefix = key_a.split(".lora_A.")[0]
        b = adapter[key_a.replace(".lora_A.", ".lora_B.")]
        target = prefix.split(".")[-1]
        w = base[prefix + ".weight"]
        scaling = settings.alpha_of(target) / settings.rank(target)  # peft's lora_alpha / r of the module
        out[prefix + ".weight"] = (w.float() + (b.float() @ a.float()) * scaling).to(dtype or w.dtype)
    return out


class LoraMergedReader(megatron_io.MegatronReader):
    """HF-named tensors of a Megatron base checkpoint with an adapter merged in, any adapter layout."""

    def __init__(self, root: str, adapter_root: str):
        super().__init__(root)
        self.adapter = adapter_ckpt.AdapterCheckpoint(adapter_root)
        adapter_ckpt.check_same_model(self.adapter, self.layout, root)
        self._peft = self.adapter.peft_tensors()  # small; re-split below for the base's layout

    def stage_shards(self, stage: int) -> list:
        # An NF4 base (QLoRA) is dequantised first (MegatronReader) and the merged weights stay fp32, as peft's merge
        # of a 4-bit layer (dequantised W + the fp32 update) before it quantises them again; the writer casts them.
        rows = lora_rows(self.adapter.settings.targets)
        dtype = torch.float32 if self.info.is_nf4 else None
        return [merge_shard(base, hf_rank_to_mcore(self._peft.__getitem__, self.layout, stage, rank, table=rows),
                            self.adapter.settings, dtype)
                for rank, base in enumerate(super().stage_shards(stage))]


# ----------------------------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------------------------


def _hf_module(peft_name: str) -> str:
    return peft_name.split(".")[-3]  # base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight -> q_proj


def exported_config(settings: LoraSettings, base_model_name_or_path: Optional[str] = None):
    """peft's LoraConfig of an exported adapter: HF module names, each fused linear's rank on its HF modules."""
    from peft import LoraConfig

    modules = {t: [_hf_module(h) for h in LORA_PAIRS[t][0].hf] for t in settings.targets}
    patterns = [(m, t) for t, _ in settings.ranks for m in modules[t]]
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias="none",
                      task_type="CAUSAL_LM", target_modules=sorted(m for ms in modules.values() for m in ms),
                      rank_pattern={m: settings.rank(t) for m, t in patterns},
                      alpha_pattern={m: settings.alpha_of(t) for m, t in patterns},
                      base_model_name_or_path=base_model_name_or_path)


def export_peft(adapter_root: str, save_dir: str, base_model_name_or_path: Optional[str] = None) -> str:
    """Write the adapter checkpoint in ``adapter_root`` as a Hugging Face PEFT adapter directory."""
    from safetensors.torch import save_file

    adapter = adapter_ckpt.AdapterCheckpoint(adapter_root)
    tensors = {k: v.contiguous().clone() for k, v in adapter.peft_tensors().items()}  # a fused A: one copy each
    with AtomicDir(save_dir, "the PEFT adapter") as tmp:
        save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        exported_config(adapter.settings, base_model_name_or_path).save_pretrained(tmp)
    return save_dir


# ----------------------------------------------------------------------------------------------------------------
# import
# ----------------------------------------------------------------------------------------------------------------


def read_peft(peft_dir: str):
    """(LoraConfig, tensors) of a Hugging Face PEFT LoRA adapter directory (local; never the Hub)."""
    from peft import PeftConfig, PeftType

    if not os.path.isfile(os.path.join(peft_dir, ADAPTER_CONFIG)):
        raise CheckpointError(f"{peft_dir}: no {ADAPTER_CONFIG}; not a PEFT adapter directory")
    config = PeftConfig.from_pretrained(peft_dir)
    unsupported = [what for what, bad in (
        (f"peft_type {config.peft_type}", config.peft_type != PeftType.LORA),
        ("use_dora", getattr(config, "use_dora", False)), ("use_rslora", getattr(config, "use_rslora", False)),
        (f"bias {getattr(config, 'bias', None)!r}", getattr(config, "bias", "none") != "none"),
        ("modules_to_save", bool(getattr(config, "modules_to_save", None))),
        ("fan_in_fan_out", getattr(config, "fan_in_fan_out", False))) if bad]
    if unsupported:
        raise CheckpointError(f"{peft_dir}: {', '.join(unsupported)} is not supported (plain LoRA on the linears "
                              "of attention and MLP is)")
    return config, read_peft_weights(peft_dir)


def read_peft_weights(peft_dir: str) -> Dict[str, Tensor]:
    """The tensors of a PEFT adapter directory, as peft's ``load_peft_weights`` finds them (safetensors first, else
    ``adapter_model.bin``) but never from the Hub, and the ``.bin`` only through ``safe_load`` (the allow-list: a
    hostile pickle is refused in one line naming it). One ``CheckpointError`` line for anything unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    st, pickled = os.path.join(peft_dir, ADAPTER_WEIGHTS), os.path.join(peft_dir, ADAPTER_PICKLE)
    if os.path.isfile(st):
        try:
            tensors = load_file(st, device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{st}: cannot read the adapter weights ({_first_line(e)})") from None
    elif os.path.isfile(pickled):
        tensors = safe_load.load(pickled, mmap=False)
        if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
            raise CheckpointError(f"{pickled}: not a PEFT adapter state dict (a dict of tensors)")
    else:
        raise CheckpointError(f"{peft_dir}: no {ADAPTER_WEIGHTS} or {ADAPTER_PICKLE}; not a PEFT adapter directory")
    return dict(tensors)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _module_alpha_rank(config, module: str) -> Tuple[float, int]:
    from peft.utils.other import get_pattern_key

    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
    return float(alpha), int(r)


def fuse_peft(config, tensors: Dict[str, Tensor], spec: ModelSpec, where: str = "adapter"
              ) -> Tuple[LoraSettings, Dict[str, Tensor]]:
    """PEFT adapter tensors -> (settings, tensors named for every HF module of each adapted fused linear, the A of a
    fused linear equal on all its modules): shared A where the modules' A's are equal, else block-structured (module
    docstring)."""
    shapes = hf_shapes(spec)
    scaling = config.lora_alpha / config.r
    used: set = set()
    out: Dict[str, Tensor] = {}
    ranks: Dict[str, int] = {}
    for row in TABLE:
        target = lora_target(row)
        if target is None:
            continue
        row_a, row_b = LORA_PAIRS[target]
        present = [j for j, name in enumerate(row_a.hf) if _fmt(name, 0) in tensors]
        if not present:
            continue
        per_layer: List[Tuple[List[Tensor], List[Tensor]]] = []
        for i in range(spec.num_layers):
            try:
                a = [tensors[_fmt(row_a.hf[j], i)] for j in present]
                b = [tensors[_fmt(row_b.hf[j], i)] for j in present]
            except KeyError as e:
                raise CheckpointError(f"{where}: {e.args[0]} is missing (adapters on some layers only are not "
                                      "supported)") from None
            used.update(_fmt(row_a.hf[j], i) for j in present)
            used.update(_fmt(row_b.hf[j], i) for j in present)
            for j, aj in zip(present, a):
                module = _fmt(row_a.hf[j], i)[len(PEFT_PREFIX):-len(".lora_A.weight")]
                alpha, r = _module_alpha_rank(config, module)
                if aj.shape[0] != r or not math.isclose(alpha / r, scaling, rel_tol=1e-12):
                    raise CheckpointError(f"{where}: {module} has rank {aj.shape[0]} and alpha {alpha:g}; every "
                                          f"module must be scaled by lora_alpha / r = {scaling:g}")
            per_layer.append((a, b))
        shared = all(all(torch.equal(a[0], x) for x in a[1:]) for a, _ in per_layer)
        for i, (a, b) in enumerate(per_layer):
            a = [x.float() for x in a]
            b = [x.float() for x in b]
            if shared:
                a_fused, widths = a[0], None
            else:
                a_fused, widths = torch.cat(a, dim=0), [x.shape[0] for x in a]
            rank = a_fused.shape[0]
            for j, name in enumerate(row_b.hf):
                out[_fmt(row_a.hf[j], i)] = a_fused
                out_dim = shapes[_fmt(row.hf[j], i)][0]
                bj = torch.zeros(out_dim, rank)
                if j in present:
                    k = present.index(j)
                    start = 0 if shared else sum(widths[:k])
                    bj[:, start:start + b[k].shape[1]] = b[k]
                out[_fmt(name, i)] = bj
            ranks[target] = rank
    unused = sorted(set(tensors) - used)
    if unused:
        raise CheckpointError(f"{where}: tensors that are not LoRA on attention/MLP linears, e.g. {unused[0]}")
    if not ranks:
        raise CheckpointError(f"{where}: no LoRA adapters on q/k/v/o/gate/up/down_proj")
    settings = LoraSettings(tuple(ranks), int(config.r), float(config.lora_alpha),
                            float(config.lora_dropout or 0.0), tuple(ranks.items()))
    return settings, out


def layout_of_base(base_dir: str, tp: Optional[int] = None, pp: Optional[int] = None,
                   make_vocab_size_divisible_by: Optional[int] = None) -> Layout:
    """The layout an imported adapter is written for: a Megatron base checkpoint's (its tp/pp unless given), or a
    Hugging Face base model's config with the given sizes."""
    if os.path.exists(os.path.join(base_dir, megatron_io.TRACKER)):
        have = megatron_io.CheckpointInfo.read(base_dir).layout
        return Layout(have.spec, tp or have.tp, pp or have.pp,
                      make_vocab_size_divisible_by or have.make_vocab_size_divisible_by)
    if os.path.isfile(os.path.join(base_dir, "config.json")):
        return Layout(spec_from_hf_config(base_dir), tp or 1, pp or 1, make_vocab_size_divisible_by or 1)
    raise CheckpointError(f"{base_dir}: neither a Megatron checkpoint nor a Hugging Face model folder")


def import_peft(peft_dir: str, save_dir: str, layout: Layout) -> LoraSettings:
    """Write a Hugging Face PEFT LoRA adapter as an adapter checkpoint for ``layout`` (the base model's)."""
    config, tensors = read_peft(peft_dir)
    settings, fused = fuse_peft(config, tensors, layout.spec, peft_dir)
    adapter_ckpt.write(save_dir, layout, settings, fused.__getitem__)
    return settings
