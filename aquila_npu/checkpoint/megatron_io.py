"""Megatron checkpoint directories, the layout Megatron-LM / ModelLink users know:

    <dir>/latest_checkpointed_iteration.txt              the iteration, e.g. "1" (or "release")
    <dir>/iter_0000001/mp_rank_TT/model_optim_rng.pt       pipeline size 1
    <dir>/iter_0000001/mp_rank_TT_PPP/model_optim_rng.pt   pipeline size > 1

Each file is a dict with ``model`` (the megatron-core state dict of that tp/pp rank), ``checkpoint_version`` 3.0,
``iteration``, ``args`` (a Namespace of the architecture flags) and ``aquila`` (the architecture as a ModelSpec dict,
the layout and the tokenizer's vocab size), so later commands need not repeat architecture flags. Training adds
``optimizer``, ``opt_param_scheduler``, ``rng_state``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from aquila_npu.checkpoint import safe_load
from aquila_npu.errors import CheckpointError
from aquila_npu.models import arch_flags
from aquila_npu.models.dtypes import dtype_name, parse_dtype
from aquila_npu.models.registry import ModelSpec
from aquila_npu.outputs.atomic import writing
from aquila_npu.weights.mapping import Layout, hf_names, mcore_stage_to_hf

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0
NF4_ENTRY = "qlora_nf4"  # a QLoRA base's quantisation (aquila_npu.weights.nf4.settings)


def _rank_sub(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def rank_dir(iteration: int, tp_rank: int, pp_rank: int, pp: int) -> str:
    return os.path.join(f"iter_{iteration:07d}", _rank_sub(tp_rank, pp_rank, pp))


def megatron_args(layout: Layout, params_dtype: torch.dtype) -> argparse.Namespace:
    """The ``args`` Megatron-LM stores: the architecture flags, the layout and the dtype flags."""
    return arch_flags.megatron_namespace(
        layout.spec, tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        make_vocab_size_divisible_by=layout.make_vocab_size_divisible_by, padded_vocab_size=layout.padded_vocab,
        params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16)


def checkpoint_meta(layout: Layout, params_dtype: torch.dtype) -> dict:
    return {"spec": dataclasses.asdict(layout.spec), "tp": layout.tp, "pp": layout.pp,
            "make_vocab_size_divisible_by": layout.make_vocab_size_divisible_by,
            "padded_vocab_size": layout.padded_vocab, "tokenizer_vocab_size": layout.spec.vocab_size,
            "params_dtype": dtype_name(params_dtype)}


def save_rank(root: str, iteration: int, layout: Layout, pp_rank: int, tp_rank: int, sd: Dict[str, torch.Tensor],
              params_dtype: torch.dtype, extra: Optional[dict] = None) -> None:
    """Write one rank's ``model_optim_rng.pt``."""
    d = os.path.join(root, rank_dir(iteration, tp_rank, pp_rank, layout.pp))
    obj = {"args": megatron_args(layout, params_dtype), "checkpoint_version": CHECKPOINT_VERSION,
           "iteration": iteration, "model": sd, "aquila": checkpoint_meta(layout, params_dtype)}
    obj.update(extra or {})
    save_file(obj, os.path.join(d, "model_optim_rng.pt"), "the checkpoint of one model-parallel rank")


class _Writes:
    """A file's ``write`` for torch.save, keeping the OSError of a failed write: torch's zip writer reports it as
    ``unexpected pos ...`` when the failure comes while it finishes the archive."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self):
        self.f.flush()


def save_file(obj, path: str, what: str) -> None:
    """``torch.save`` into ``path`` (its folder created); a write error (a full disk) is one OutputError line."""
    with writing(path, what):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            out = _Writes(f)
            try:
                torch.save(obj, out)
            except RuntimeError:
                if out.error is not None:
                    raise out.error from None
                raise


def write_tracker(root: str, iteration: int) -> None:
    path = os.path.join(root, TRACKER)
    with writing(path, "the tracker file"), open(path, "w") as f:
        f.write(str(iteration))


def read_iteration(root: str) -> int:
    path = os.path.join(root, TRACKER)
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        raise CheckpointError(f"{root}: no {TRACKER}; not a Megatron checkpoint directory") from None
    if text == "release":
        return 0
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path}: {text!r} is not an iteration number") from None


def unnamed_iterations(root: str) -> List[str]:
    """The ``iter_*`` directories of ``root`` newer than the iteration its tracker names (every one when there is no
    tracker): put in place whole by a run killed before it moved the tracker (the rename is atomic and comes after
    every rank wrote), or left when the tracker was set back by hand to resume from an earlier iteration."""
    try:
        named = read_iteration(root)
    except CheckpointError:
        named = -1
    found = []
    for entry in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        m = re.fullmatch(r"iter_(\d{7,})", entry)
        if m and int(m.group(1)) > named and os.path.isdir(os.path.join(root, entry)):
            found.append(entry)
    return found


def note_unnamed_iterations(root: str, say: Callable[[str], None] = print) -> List[str]:
    """The rule for ``unnamed_iterations`` when a run claims ``root`` as its ``--save``: each is kept (never removed:
    it is complete, and it may be one the user set the tracker back from), named in one line; the run's own save of
    that iteration replaces it. Returns them."""
    found = unnamed_iterations(root)
    try:
        why = f"it is newer than iteration {read_iteration(root)}, which {TRACKER} names"
    except CheckpointError:
        why = f"there is no {TRACKER} naming it"
    for entry in found:
        n = int(entry[len("iter_"):])
        say(f"kept {os.path.join(root, entry)}: {why} (a run was killed before naming it, or the tracker was set "
            f"back by hand); a save of iteration {n} replaces it, and writing {n} into {TRACKER} makes --load resume "
            "from it")
    return found


def _iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, "release") if iteration == 0 and os.path.isdir(os.path.join(root, "release")) \
        else os.path.join(root, f"iter_{iteration:07d}")


def rank_path(root: str, iteration: int, tp_rank: int, pp_rank: int, pp: int) -> str:
    """The directory of one rank's files in an existing checkpoint (``release`` or ``iter_*``)."""
    return os.path.join(_iter_dir(root, iteration), _rank_sub(tp_rank, pp_rank, pp))


def load_rank(root: str, iteration: int, tp_rank: int, pp_rank: int, pp: int) -> dict:
    """One rank's ``model_optim_rng.pt``, read without running code (``safe_load``)."""
    return safe_load.load(os.path.join(rank_path(root, iteration, tp_rank, pp_rank, pp), "model_optim_rng.pt"))


@dataclass
class CheckpointInfo:
    """What a Megatron checkpoint directory holds, read once (no process group needed): its iteration, layout
    (architecture, tp/pp, vocabulary padding), stored dtype and whether training wrote it (optimizer state).

    ``load_rank`` hands out one rank's file; rank (0, 0)'s, already read for the metadata, is not read again."""

    root: str
    iteration: int
    layout: Layout
    params_dtype: torch.dtype
    trained: bool  # written by training (optimizer, scheduler, RNG), not by the converter
    distributed_optimizer: bool = False  # training with --use-distributed-optimizer wrote it (per-DP-rank shards)
    data_parallel_size: Optional[int] = None  # the data-parallel size of the run that wrote it (training)
    _first: Optional[dict] = field(default=None, repr=False, compare=False)
    nf4: Optional[dict] = None  # a QLoRA base (convert_ckpt.py --qlora-nf4): how its linears are quantised

    @property
    def is_nf4(self) -> bool:
        return self.nf4 is not None

    @property
    def spec(self) -> ModelSpec:
        return self.layout.spec

    @classmethod
    def read(cls, root: str) -> "CheckpointInfo":
        """CheckpointError when ``root`` is not a checkpoint written by aquila_npu."""
        iteration = read_iteration(root)
        d = _iter_dir(root, iteration)
        if not os.path.isdir(d):
            raise CheckpointError(f"{root}: {TRACKER} says iteration {iteration} but {d} is missing")
        ranks = sorted(os.listdir(d))
        if not ranks:
            raise CheckpointError(f"{d}: no mp_rank_* directories")
        single_stage = os.path.isdir(os.path.join(d, "mp_rank_00"))
        first = load_rank(root, iteration, 0, 0, 1 if single_stage else 2)  # pp > 1 names it mp_rank_00_000
        meta = first.get("aquila")
        if meta is None:
            raise CheckpointError(f"{root}: the checkpoint carries no architecture ('aquila' entry); it was not "
                                  "written by aquila_npu")
        layout = Layout(ModelSpec(**meta["spec"]), meta["tp"], meta["pp"], meta["make_vocab_size_divisible_by"])
        expected = layout.tp * layout.pp
        if len(ranks) != expected:
            raise CheckpointError(f"{d}: {len(ranks)} rank directories, expected {expected} (tp{layout.tp} x "
                                  f"pp{layout.pp})")
        return cls(root, iteration, layout, parse_dtype(meta["params_dtype"]), "optimizer" in first,
                   bool(first.get("distributed_optimizer")), first.get("data_parallel_size"), first,
                   nf4=first.get(NF4_ENTRY))

    @classmethod
    def find(cls, root: Optional[str]) -> Optional["CheckpointInfo"]:
        """The checkpoint in ``root``, or None when ``root`` holds no tracker file (nothing saved yet)."""
        if not root or not os.path.exists(os.path.join(root, TRACKER)):
            return None
        return cls.read(root)

    def check_resume(self, layout: Layout, *, finetune: bool, no_load_optim: bool, use_distributed_optimizer: bool,
                     data_parallel_size: int, flag: str = "--load") -> None:
        """What a training run loading this checkpoint at ``layout`` would refuse, checked from the metadata
        before any output, device or process group exists (``training.checkpointing.load`` says the same): another
        tensor/pipeline layout; optimizer state saved with(out) ``--use-distributed-optimizer`` unlike this run, or
        by another number of data-parallel ranks."""
        from aquila_npu.checkpoint.load_model import relayout_command

        have = self.layout
        if (have.tp, have.pp) != (layout.tp, layout.pp):
            raise CheckpointError(
                f"{flag} {self.root} is tp{have.tp}-pp{have.pp}, but this run is tp{layout.tp}-pp{layout.pp}; re-lay "
                f"it out with: {relayout_command(self.root, layout.tp, layout.pp)}")
        if finetune or no_load_optim or not self.trained:
            return
        if self.distributed_optimizer != use_distributed_optimizer:
            raise CheckpointError(f"{flag} {self.root}: saved {'with' if self.distributed_optimizer else 'without'} "
                                  "--use-distributed-optimizer; pass the same flag, or --no-load-optim")
        if self.distributed_optimizer and self.data_parallel_size != data_parallel_size:
            raise CheckpointError(f"{flag} {self.root}: its distributed-optimizer state was saved by "
                                  f"{self.data_parallel_size} data-parallel ranks, this run has {data_parallel_size}; "
                                  "use the same number of processes, or --no-load-optim")

    def load_rank(self, tp_rank: int, pp_rank: int) -> dict:
        if (tp_rank, pp_rank) == (0, 0) and self._first is not None:
            first, self._first = self._first, None
            return first
        return load_rank(self.root, self.iteration, tp_rank, pp_rank, self.layout.pp)

    def rank_path(self, tp_rank: int, pp_rank: int) -> str:
        return rank_path(self.root, self.iteration, tp_rank, pp_rank, self.layout.pp)


class MegatronReader:
    """HF-named tensors from a Megatron checkpoint. The TP shards of one source pipeline stage are memory-mapped and
    each HF tensor is merged from them when asked for, so the reader holds one merged row at a time (callers ask in
    ``hf_names`` order; asking for an earlier tensor of the stage restarts the merge)."""

    def __init__(self, root: str):
        self.root = root
        self.info = CheckpointInfo.read(root)
        self.iteration, self.layout, self.dtype = self.info.iteration, self.info.layout, self.info.params_dtype
        self.spec = self.layout.spec
        self._stage: Optional[int] = None
        self._shards: list = []
        self._merged: Iterator[Tuple[str, torch.Tensor]] = iter(())
        self._ready: Dict[str, torch.Tensor] = {}
        self._order = {name: i for i, name in enumerate(hf_names(self.spec))}
        self._last = -1

    def stage_of(self, name: str) -> int:
        if name.startswith("model.layers."):
            return self.layout.stage_of_layer(int(name.split(".")[2]))
        return 0 if name == "model.embed_tokens.weight" else self.layout.pp - 1

    def release(self) -> None:
        """Unmap the current stage's files."""
        self._stage, self._shards, self._merged, self._ready, self._last = None, [], iter(()), {}, -1

    def stage_shards(self, stage: int) -> list:
        """The megatron-core state dicts of one pipeline stage, one per TP rank (memory-mapped); the linears of an
        NF4 base dequantised by bitsandbytes (to the dtype they were quantised from)."""
        shards = [self.info.load_rank(r, stage)["model"] for r in range(self.layout.tp)]
        if self.info.is_nf4:
            from aquila_npu.weights import nf4

            shards = [nf4.dequantised_state(sd, self.dtype) for sd in shards]
        return shards

    def _restart(self, stage: int) -> None:
        if stage != self._stage:
            self.release()
            self._shards = self.stage_shards(stage)
            self._stage = stage
        self._merged = mcore_stage_to_hf(self._shards, self.layout, stage)
        self._ready, self._last = {}, -1

    def get(self, name: str) -> torch.Tensor:
        if name not in self._order:
            raise CheckpointError(f"{self.root}: no tensor {name} in this model")
        stage = self.stage_of(name)
        if stage != self._stage or (name not in self._ready and self._order[name] < self._last):
            self._restart(stage)
        while name not in self._ready:
            try:
                key, t = next(self._merged)
            except StopIteration:
                raise CheckpointError(f"{self.root}: tensor {name} missing from pipeline stage {stage}") from None
            except KeyError as e:
                raise CheckpointError(f"{self.root}: {e.args[0]}") from None
            self._ready[key] = t
            self._last = max(self._last, self._order[key])
        return self._ready.pop(name)
