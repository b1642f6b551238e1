"""Load a converted Megatron checkpoint for inference: this rank's pipeline stage, built and filled.

    info = CheckpointInfo.read(load_dir)                      # aquila_npu.checkpoint.megatron_io; no process group
    dev = setup(device)                                       # aquila_npu.device.setup
    loaded = load_model_for_inference(info, dev)              # at the checkpoint's tp/pp
    loaded.model                                              # this rank's megatron-core GPTModel stage, eval()

The architecture comes from the checkpoint (the ``aquila`` entry written by the converter): commands need no
architecture flags (those given are checked with ``aquila_npu.models.arch_flags.check``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.transformer.transformer_config import TransformerConfig

from aquila_npu.checkpoint.megatron_io import CheckpointInfo
from aquila_npu.errors import CheckpointError
from aquila_npu.models.config import transformer_config
from aquila_npu.models.gpt import build_model
from aquila_npu.models.registry import ModelSpec
from aquila_npu.parallel import agreed, initialize_model_parallel
from aquila_npu.weights.load import load_stage_state
from aquila_npu.weights.mapping import Layout

CONVERTER = "tools/checkpoint/convert_ckpt.py"


@dataclass
class LoadedModel:
    """One rank's part of a checkpoint, ready to run."""

    model: torch.nn.Module  # this rank's stage (megatron-core GPTModel), on the device, eval()
    spec: ModelSpec  # the architecture
    layout: Layout  # tp / pp / vocab padding of the checkpoint (equal to the running model's)
    config: TransformerConfig
    params_dtype: torch.dtype
    iteration: int
    load_dir: str

    @property
    def vocab_size(self) -> int:
        """The real vocabulary (logits beyond it are padding)."""
        return self.spec.vocab_size

    @property
    def padded_vocab(self) -> int:
        return self.layout.padded_vocab


def relayout_command(load_dir: str, tp: int, pp: int) -> str:
    return (f"python {CONVERTER} --model-type GPT --loader megatron --saver megatron --load-dir {load_dir} "
            f"--save-dir {load_dir.rstrip('/')}-tp{tp}-pp{pp} --target-tensor-parallel-size {tp} "
            f"--target-pipeline-parallel-size {pp}")


def check_parallel_sizes(info: CheckpointInfo, tp: int, pp: int) -> None:
    """A checkpoint is split for one tp/pp; running another needs a conversion (the error says which)."""
    layout = info.layout
    if (layout.tp, layout.pp) != (tp, pp):
        raise CheckpointError(
            f"--load {info.root} is split for tp{layout.tp}-pp{layout.pp}, not tensor-parallel {tp} x "
            f"pipeline-parallel {pp}: run with --tensor-model-parallel-size {layout.tp} "
            f"--pipeline-model-parallel-size {layout.pp} ({layout.tp * layout.pp} processes), or convert it: "
            f"{relayout_command(info.root, tp, pp)}")


def build_stage(spec: ModelSpec, layout: Layout, device, shard: Dict[str, torch.Tensor], *,
                params_dtype: torch.dtype, pp_rank: int, parallel_output: bool = False):
    """Build this rank's stage on ``device`` (an ``aquila_npu.device.setup.Device``) and load ``shard`` into it.

    Returns (model in eval mode, TransformerConfig).
    """
    # Every weight is filled from ``shard`` below (load_stage_state refuses a shard that misses any), so megatron-core
    # need not draw random values for them (most of the model build, 3.3 s of a 135M model's start-up on a loaded
    # CPU): its initialisation runs with zeros instead. Not perform_initialization=False: megatron-core then also
    # skips marking the tensor-parallel attributes of the weights, which parameter counts and gradient clipping read.
    cfg = transformer_config(spec, tensor_parallel=layout.tp, pipeline_parallel=layout.pp, params_dtype=params_dtype,
                             init_method=torch.nn.init.zeros_, output_layer_init_method=torch.nn.init.zeros_,
                             embedding_init_method=torch.nn.init.zeros_, **device.backend.config_overrides())
    model = build_model(spec, cfg, device.backend, padded_vocab=layout.padded_vocab, pre_process=pp_rank == 0,
                        post_process=pp_rank == layout.pp - 1, pp_rank=pp_rank, parallel_output=parallel_output)
    load_stage_state(model, {k: v.to(params_dtype) for k, v in shard.items()})
    return model.to(device.torch_device).eval(), cfg


def load_model_for_inference(info: CheckpointInfo, device, *, params_dtype: Optional[torch.dtype] = None,
                             parallel_output: bool = False) -> LoadedModel:
    """Build and load this rank's stage of the checkpoint ``info`` describes (``CheckpointInfo.read``; the caller
    checks tp/pp and architecture flags against it before any process group exists).

    ``device``: the ``Device`` returned by ``aquila_npu.device.setup.setup()`` (torch.distributed initialised).
    megatron-core's model-parallel state is initialised here at the checkpoint's tp/pp when it is not yet (and must
    match when it is). ``params_dtype``: compute dtype (default: the checkpoint's). ``parallel_output=False`` gives
    full-vocabulary logits on every tensor-parallel rank of the last stage.
    """
    layout = info.layout
    if not ps.model_parallel_is_initialized():
        initialize_model_parallel(layout.tp, layout.pp)
    running = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
    if running != (layout.tp, layout.pp):
        raise CheckpointError(f"model parallel state is tp{running[0]}-pp{running[1]}, the checkpoint "
                              f"tp{layout.tp}-pp{layout.pp}")
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    dtype = params_dtype or info.params_dtype
    shard = agreed(lambda: info.load_rank(tp_rank, pp_rank))["model"]  # a refused file ends every rank alike
    model, cfg = build_stage(layout.spec, layout, device, shard, params_dtype=dtype, pp_rank=pp_rank,
                             parallel_output=parallel_output)
    return LoadedModel(model=model, spec=layout.spec, layout=layout, config=cfg, params_dtype=dtype,
                       iteration=info.iteration, load_dir=info.root)
