"""A base checkpoint with adapters on it, for inference without a merge (MindSpeed-LLM's ``--lora-load`` at
inference): this rank's stage built, the base loaded (full precision, or QLoRA's NF4 base with 4-bit linears), the
adapter checkpoint's tensors loaded into peft's layers.

    model, cfg = adapted_stage(info, device, params_dtype=..., pp_rank=..., adapter=AdapterCheckpoint(dir))

Either base works with either adapter: a LoRA adapter on an NF4 base, a QLoRA adapter on the full-precision base
(the weights the NF4 base was quantised from).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import parallel_state

from aquila_npu.checkpoint.load_model import LoadedModel
from aquila_npu.checkpoint.megatron_io import CheckpointInfo
from aquila_npu.compat import versions
from aquila_npu.errors import CheckpointError
from aquila_npu.lora import checkpoint as adapter_ckpt
from aquila_npu.lora.checkpoint import AdapterCheckpoint, check_same_model
from aquila_npu.models.config import transformer_config
from aquila_npu.models.gpt import build_model
from aquila_npu.parallel import agreed, initialize_model_parallel
from aquila_npu.weights.load import load_stage_state


@dataclass
class AdaptedModel(LoadedModel):
    adapter_note: str = ""  # for banners: ", LoRA adapter DIR" / ", NF4 base"


def check_adapter(info: CheckpointInfo, root: str) -> AdapterCheckpoint:
    """The --lora-load adapter for the base ``info``, checked before any process group (``check_fits``)."""
    adapter = adapter_ckpt.find(root)
    if adapter is None:
        raise CheckpointError(f"--lora-load {root}: no adapter checkpoint there (no latest_checkpointed_iteration.txt)")
    check_fits(info, adapter)
    return adapter


def check_fits(info: CheckpointInfo, adapter: AdapterCheckpoint) -> None:
    """An adapter of the base's model and layout."""
    check_same_model(adapter, info.layout, info.root)
    if (adapter.layout.tp, adapter.layout.pp) != (info.layout.tp, info.layout.pp):
        raise CheckpointError(f"--lora-load {adapter.root} is tp{adapter.layout.tp}-pp{adapter.layout.pp}, the base "
                              f"{info.root} tp{info.layout.tp}-pp{info.layout.pp}: export the adapter "
                              "(convert_ckpt.py --save-lora-to-hf) and import it for the base (--loader peft "
                              "--base-dir)")


def load_adapted_for_inference(info: CheckpointInfo, device, lora_load: Optional[str], *,
                               params_dtype: Optional[torch.dtype] = None,
                               parallel_output: bool = False) -> AdaptedModel:
    """``checkpoint.load_model.load_model_for_inference`` for a base with an adapter (or QLoRA's NF4 base alone)."""
    adapter = check_adapter(info, lora_load) if lora_load else None
    if adapter is not None:
        versions.require("peft")
    layout = info.layout
    if not parallel_state.model_parallel_is_initialized():
        initialize_model_parallel(layout.tp, layout.pp)
    dtype = params_dtype or info.params_dtype  # (an NF4 base's: the dtype it was quantised from)
    model, cfg = adapted_stage(info, device, params_dtype=dtype, adapter=adapter, parallel_output=parallel_output,
                               pp_rank=parallel_state.get_pipeline_model_parallel_rank())
    note = (", NF4 base" if info.is_nf4 else "") + (f", adapter {lora_load}" if lora_load else "")
    return AdaptedModel(model=model, spec=layout.spec, layout=layout, config=cfg, params_dtype=dtype,
                        iteration=info.iteration, load_dir=info.root, adapter_note=note)


def adapted_stage(info: CheckpointInfo, device, *, params_dtype: torch.dtype, pp_rank: int,
                  adapter: Optional[AdapterCheckpoint] = None, parallel_output: bool = False):
    """(this rank's stage in eval mode, TransformerConfig) of the base ``info`` with ``adapter`` (or none)."""
    from aquila_npu.lora.layers import apply_lora
    from aquila_npu.lora.qlora import NF4Backend, base_dtype, nf4_rank_state
    from aquila_npu.lora.state import load_adapters, load_base

    spec, layout = info.spec, info.layout
    if adapter is not None:
        check_fits(info, adapter)
    backend = NF4Backend(device.backend, base_dtype(info)) if info.is_nf4 else device.backend
    # every weight is loaded below: megatron-core's initialisation runs with zeros (checkpoint.load_model)
    cfg = transformer_config(spec, tensor_parallel=layout.tp, pipeline_parallel=layout.pp, params_dtype=params_dtype,
                             init_method=torch.nn.init.zeros_, output_layer_init_method=torch.nn.init.zeros_,
                             embedding_init_method=torch.nn.init.zeros_, **device.backend.config_overrides())
    model = build_model(spec, cfg, backend, padded_vocab=layout.padded_vocab, pre_process=pp_rank == 0,
                        post_process=pp_rank == layout.pp - 1, pp_rank=pp_rank, parallel_output=parallel_output)
    if adapter is not None:
        apply_lora(model, cfg, adapter.settings, layout, pp_rank)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    state = nf4_rank_state(info, params_dtype)
    if adapter is None:
        load_stage_state(model, state)
    else:
        load_base(model, state)
        missing, unexpected = load_adapters(model, agreed(lambda: adapter.rank_file(tp_rank, pp_rank))["model"])
        if missing or unexpected:
            raise CheckpointError(f"--lora-load {adapter.root}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.to(device.torch_device).eval(), cfg
