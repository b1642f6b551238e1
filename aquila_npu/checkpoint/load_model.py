"""Load a converted Megatron checkpoint for inference: this rank's pipeline stage, built and filled.

    dev = setup(device)                                       # aquila_npu.device.setup
    loaded = load_model_for_inference(load_dir, dev)          # tp/pp from the checkpoint unless given
    loaded.model                                              # this rank's megatron-core GPTModel stage, eval()

The architecture comes from the checkpoint (the ``aquila`` entry written by the converter): commands need no
architecture flags. Flags that are given (ModelLink's ``--num-layers``, ``--hidden-size``, ...) are checked against
the checkpoint and a disagreement is an error naming both values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.transformer.transformer_config import TransformerConfig

from aquila_npu.checkpoint import megatron_io
from aquila_npu.errors import ArchitectureMismatch, CheckpointError
from aquila_npu.models.config import transformer_config
from aquila_npu.models.gpt import build_model, padded_vocab_size
from aquila_npu.models.registry import ModelSpec
from aquila_npu.parallel import initialize_model_parallel
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


def check_parallel_sizes(load_dir: str, layout: Layout, tp: int, pp: int) -> None:
    """A checkpoint is split for one tp/pp; running another needs a conversion (the error says which)."""
    if (layout.tp, layout.pp) != (tp, pp):
        raise CheckpointError(
            f"--load {load_dir} is split for tp{layout.tp}-pp{layout.pp}, not tensor-parallel {tp} x "
            f"pipeline-parallel {pp}: run with --tensor-model-parallel-size {layout.tp} "
            f"--pipeline-model-parallel-size {layout.pp} ({layout.tp * layout.pp} processes), or convert it: "
            f"{relayout_command(load_dir, tp, pp)}")


# ModelLink flag -> (ModelSpec attribute or callable, flag spelling). Values None mean "not given".
ARCH_FLAGS = {  # argparse dest -> (ModelSpec field, flag); shared with aquila_npu.training
    "num_layers": ("num_layers", "--num-layers"),
    "hidden_size": ("hidden_size", "--hidden-size"),
    "ffn_hidden_size": ("intermediate_size", "--ffn-hidden-size"),
    "num_attention_heads": ("num_attention_heads", "--num-attention-heads"),
    "num_query_groups": ("num_key_value_heads", "--num-query-groups"),
    "max_position_embeddings": ("max_position_embeddings", "--max-position-embeddings"),
    "norm_epsilon": ("rms_norm_eps", "--norm-epsilon"),
    "rotary_base": ("rope_theta", "--rotary-base"),
    "vocab_size": ("vocab_size", "--vocab-size"),
}


def check_architecture(spec: ModelSpec, layout: Layout, flags: Mapping[str, object], load_dir: str = "",
                       source: str = "checkpoint") -> None:
    """Compare architecture flags (ModelLink names, argparse dests; None = not given) with the checkpoint (or what
    ``source`` names, e.g. ``--model aquila2-7b``).

    Raises ArchitectureMismatch listing every disagreement.
    """
    bad = []

    def differ(flag: str, given, actual):
        bad.append(f"{flag} {given} ({source}: {actual})")

    for dest, (attr, flag) in ARCH_FLAGS.items():
        given = flags.get(dest)
        if given is None:
            continue
        actual = getattr(spec, attr)
        same = math.isclose(float(given), float(actual), rel_tol=1e-6) if isinstance(actual, float) else \
            int(given) == int(actual)
        if not same:
            differ(flag, given, actual)
    if flags.get("group_query_attention") and flags.get("num_query_groups") is None \
            and spec.num_key_value_heads == spec.num_attention_heads:
        differ("--group-query-attention", "(set)", f"no GQA: {spec.num_key_value_heads} key/value heads")
    if flags.get("position_embedding_type") not in (None, "rope"):
        differ("--position-embedding-type", flags["position_embedding_type"], "rope")
    if flags.get("normalization") not in (None, "RMSNorm"):
        differ("--normalization", flags["normalization"], "RMSNorm")
    if flags.get("untie_embeddings_and_output_weights") and spec.tie_word_embeddings:
        differ("--untie-embeddings-and-output-weights", "(set)", "tied embeddings")
    divisible_by = flags.get("make_vocab_size_divisible_by")
    if divisible_by is not None:
        padded = padded_vocab_size(spec.vocab_size, int(divisible_by), layout.tp)
        if padded != layout.padded_vocab:
            differ("--make-vocab-size-divisible-by", divisible_by,
                   f"{layout.make_vocab_size_divisible_by}: vocab {spec.vocab_size} padded to {layout.padded_vocab}, "
                   f"the flag pads it to {padded}")
    if bad:
        raise ArchitectureMismatch(f"{load_dir or 'the ' + source}: architecture flags disagree with the {source}: "
                                   + "; ".join(bad) + f". Drop them (the architecture is read from the {source}) "
                                   f"or use the {source} they describe.")


def read_checkpoint(load_dir: str):
    """(iteration, Layout, stored params dtype); CheckpointError when ``load_dir`` is not a usable checkpoint."""
    return megatron_io.read_layout(load_dir)


def build_stage(spec: ModelSpec, layout: Layout, device, shard: Dict[str, torch.Tensor], *,
                params_dtype: torch.dtype, pp_rank: int, parallel_output: bool = False):
    """Build this rank's stage on ``device`` (an ``aquila_npu.device.setup.Device``) and load ``shard`` into it.

    Returns (model in eval mode, TransformerConfig).
    """
    cfg = transformer_config(spec, tensor_parallel=layout.tp, pipeline_parallel=layout.pp, params_dtype=params_dtype,
                             **device.backend.config_overrides())
    model = build_model(spec, cfg, device.backend, padded_vocab=layout.padded_vocab, pre_process=pp_rank == 0,
                        post_process=pp_rank == layout.pp - 1, pp_rank=pp_rank, parallel_output=parallel_output)
    load_stage_state(model, {k: v.to(params_dtype) for k, v in shard.items()})
    return model.to(device.torch_device).eval(), cfg


def load_model_for_inference(load_dir: str, device, *, tp: Optional[int] = None, pp: Optional[int] = None,
                             params_dtype: Optional[torch.dtype] = None,
                             architecture: Optional[Mapping[str, object]] = None,
                             parallel_output: bool = False) -> LoadedModel:
    """Build and load this rank's stage of the checkpoint in ``load_dir``.

    ``device``: the ``Device`` returned by ``aquila_npu.device.setup.setup()`` (torch.distributed initialised).
    ``tp``/``pp``: the parallel sizes to run with (default: the checkpoint's); they must equal the checkpoint's, or
    a CheckpointError names the conversion command. megatron-core's model-parallel state is initialised here when
    it is not yet (and must match when it is). ``params_dtype``: compute dtype (default: the checkpoint's).
    ``architecture``: ModelLink-named flags to check (see ``check_architecture``). ``parallel_output=False`` gives
    full-vocabulary logits on every tensor-parallel rank of the last stage.
    """
    iteration, layout, stored_dtype = read_checkpoint(load_dir)
    tp = layout.tp if tp is None else tp
    pp = layout.pp if pp is None else pp
    check_parallel_sizes(load_dir, layout, tp, pp)
    check_architecture(layout.spec, layout, architecture or {}, load_dir)
    if not ps.model_parallel_is_initialized():
        world = torch.distributed.get_world_size()
        if world % (tp * pp):
            raise CheckpointError(f"{world} processes cannot run the tp{tp}-pp{pp} checkpoint {load_dir}: start a "
                                  f"multiple of {tp * pp}")
        initialize_model_parallel(tp, pp)
    running = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
    if running != (tp, pp):
        raise CheckpointError(f"model parallel state is tp{running[0]}-pp{running[1]}, the checkpoint tp{tp}-pp{pp}")
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    dtype = params_dtype or stored_dtype
    shard = megatron_io.load_rank(load_dir, iteration, tp_rank, pp_rank, layout.pp)["model"]
    model, cfg = build_stage(layout.spec, layout, device, shard, params_dtype=dtype, pp_rank=pp_rank,
                             parallel_output=parallel_output)
    return LoadedModel(model=model, spec=layout.spec, layout=layout, config=cfg, params_dtype=dtype,
                       iteration=iteration, load_dir=load_dir)
