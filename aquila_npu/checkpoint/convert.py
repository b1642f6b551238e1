"""HF <-> Megatron <-> Megatron conversion, one pipeline stage at a time, through the weight-mapping table.

Output is written into a temporary directory beside the target and put in place at the end
(``aquila_npu.outputs.atomic.AtomicDir``: the target is locked for the run, debris of killed runs is removed, the free
space is checked first), so a failed or killed conversion leaves no half-written checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from tqdm import tqdm

from aquila_npu.checkpoint import hf_io, megatron_io
from aquila_npu.errors import CheckpointError
from aquila_npu.models import arch_flags
from aquila_npu.models.dtypes import parse_dtype
from aquila_npu.outputs.atomic import AtomicDir
from aquila_npu.outputs import crash
from aquila_npu.weights.mapping import Layout, hf_names, hf_rank_to_mcore, hf_shapes

ITERATION = 1  # what converted checkpoints carry, as ModelLink's converter


class _Progress:
    def __init__(self, total_bytes: int, desc: str):
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                        postfix={"tensors": 0})
        self.tensors = 0

    def __call__(self, t):
        self.tensors += 1
        self.bar.update(t.numel() * t.element_size())
        self.bar.set_postfix(tensors=self.tensors, refresh=False)

    def close(self):
        self.bar.close()


def _model_bytes(spec, dtype: torch.dtype) -> int:
    return spec.num_parameters() * torch.finfo(dtype).bits // 8


def _output_dtype(reader, params_dtype: Optional[torch.dtype]) -> torch.dtype:
    """--params-dtype, else the input checkpoint's dtype, else the config's."""
    return params_dtype or getattr(reader, "dtype", None) or parse_dtype(reader.spec.torch_dtype)


def _check_megatron_target(save_dir: str, layout: Layout) -> None:
    """An existing save-dir may be replaced only by a checkpoint of the same model."""
    if not os.path.exists(save_dir):
        return
    if not os.path.isdir(save_dir):
        raise CheckpointError(f"--save-dir {save_dir} exists and is not a directory")
    if not os.listdir(save_dir):
        return
    try:
        existing = megatron_io.CheckpointInfo.read(save_dir).spec
    except CheckpointError:
        raise CheckpointError(f"--save-dir {save_dir} is not empty and holds no aquila_npu checkpoint; choose an "
                              "empty or new directory") from None
    if not arch_flags.same_architecture(existing, layout.spec):
        raise CheckpointError(f"--save-dir {save_dir} already holds a checkpoint of a different model; choose another "
                              "directory")


def to_megatron(reader, save_dir: str, tp: int, pp: int, make_vocab_size_divisible_by: int = 1,
                params_dtype: Optional[torch.dtype] = None, qlora_nf4: bool = False) -> Layout:
    """Write a Megatron checkpoint (tp x pp) from any reader with ``.spec``, ``.get(hf_name)`` (a memory-mapped
    view is fine: each rank copies only its part) and ``.release()``. ``qlora_nf4``: the decoder linears as
    bitsandbytes' NF4 (``aquila_npu.weights.nf4``: each HF linear quantised once, its shards cut from the result),
    the base of a QLoRA run."""
    layout = Layout(reader.spec, tp, pp, make_vocab_size_divisible_by)
    _check_megatron_target(save_dir, layout)
    dtype = _output_dtype(reader, params_dtype)
    quantised, table, extra = None, layout.table, None
    if qlora_nf4:
        from aquila_npu.weights import nf4

        quantised = nf4.QuantisedReader(reader, dtype)
        table = tuple(row for row in layout.table if not nf4.is_quantised_row(row))
        extra = {megatron_io.NF4_ENTRY: nf4.settings(dtype)}

    def cast(t):
        t = t.to(dtype)
        progress(t)
        return t

    # One (stage, TP rank) shard in memory at a time; safetensors inputs are memory-mapped views.
    progress = _Progress(_model_bytes(reader.spec, dtype), f"-> megatron tp{tp}-pp{pp}")
    try:
        with AtomicDir(save_dir, "the Megatron checkpoint", _model_bytes(reader.spec, dtype)) as tmp:
            crash.point("before-data")
            for stage in range(pp):
                for rank in range(tp):
                    shard = hf_rank_to_mcore(reader.get, layout, stage, rank, cast=cast, table=table)
                    if quantised is not None:  # (each HF linear quantised at its stage's first rank, kept till the
                        shard.update(nf4.rank_state(quantised, layout, stage, rank))  # stage is written)
                    megatron_io.save_rank(tmp, ITERATION, layout, stage, rank, shard, dtype, extra)
                    del shard
                    reader.release()
                    crash.point("mid-file", os.path.join(tmp, megatron_io.rank_dir(ITERATION, rank, stage, pp),
                                                          "model_optim_rng.pt"))
                if quantised is not None:
                    quantised.release()
            megatron_io.write_tracker(tmp, ITERATION)
    finally:
        progress.close()
    return layout


def to_huggingface(reader, save_dir: str, hf_dir_for_files: Optional[str] = None,
                   params_dtype: Optional[torch.dtype] = None, max_shard_bytes: int = 5 * 1024 ** 3) -> str:
    """Write a HF folder (safetensors + config.json + tokenizer files when ``hf_dir_for_files`` has them)."""
    spec = reader.spec
    dtype = _output_dtype(reader, params_dtype)
    base_cfg = None
    if hf_dir_for_files and os.path.exists(os.path.join(hf_dir_for_files, "config.json")):
        with open(os.path.join(hf_dir_for_files, "config.json")) as f:
            base_cfg = json.load(f)
        if not isinstance(base_cfg, dict) or "model_type" not in base_cfg:
            base_cfg = None  # not a Hugging Face config (FlagAI's own, of a first-generation Aquila): ours alone
    progress = _Progress(_model_bytes(spec, dtype), "-> huggingface")
    try:
        with AtomicDir(save_dir, "the Hugging Face model", _model_bytes(spec, dtype)) as tmp:
            crash.point("before-data")
            writer = hf_io.HFWriter(tmp, hf_shapes(spec), dtype, max_shard_bytes)
            try:
                for name in hf_names(spec):  # layer by layer: the reader maps each source stage once
                    t = reader.get(name).to(dtype)
                    writer.add(name, t)
                    progress(t)
                    del t
            except BaseException:
                writer.abort()
                raise
            writer.close()
            crash.point("mid-file", os.path.join(tmp, writer.files[0]))
            reader.release()
            hf_io.write_config(spec, tmp, dtype, base_cfg)
            if hf_dir_for_files:
                hf_io.copy_tokenizer_files(hf_dir_for_files, tmp)
    finally:
        progress.close()
    return save_dir
