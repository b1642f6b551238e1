"""Training checkpoints in the converter's directory format (``aquila_npu.checkpoint.megatron_io``), plus optimizer,
LR scheduler, RNG state and consumed samples.

    <save>/latest_checkpointed_iteration.txt
    <save>/iter_0000100/mp_rank_TT[_PPP]/model_optim_rng.pt   model, optimizer, scheduler, rng, args (DP rank 0)
    <save>/iter_0000100/mp_rank_TT[_PPP]/distrib_optim_dpRRR.pt   --use-distributed-optimizer: DP rank RRR's shard
                                                             (resuming it needs the same data-parallel size)

``<save>`` is claimed for the run (``SaveDir.claim``: a lock beside it naming the owner, debris of killed runs
removed). Every rank writes under ``<save>/.iter_0000100.staging.pid<PID>@<HOST>/``; once all ranks have written,
the staging directory is put in place and only then does the tracker file move (written to a temporary name, then
renamed): a crash at any point leaves ``latest_checkpointed_iteration.txt`` naming a complete checkpoint. A write
error on any rank (a full disk) ends every rank with the same one-line ``OutputError`` and the staging removed.

Every file is read with ``aquila_npu.checkpoint.safe_load`` (no code runs). The RNG states are stored as tensors and
numbers (numpy's state as ``(name, keys as int64 tensor, pos, has_gauss, cached_gaussian)``).
"""

from __future__ import annotations

import os
import random
import shutil
from typing import Optional, Tuple

import numpy as np
import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from aquila_npu.checkpoint import megatron_io, safe_load
from aquila_npu.checkpoint.load_model import relayout_command
from aquila_npu.checkpoint.megatron_io import CheckpointInfo
from aquila_npu.compat.megatron_core import load_distributed_optimizer_state
from aquila_npu.errors import CheckpointError, OutputError, UserError
from aquila_npu.outputs import owner
from aquila_npu.outputs.atomic import replace_dir, writing
from aquila_npu.parallel import agreed
from aquila_npu.outputs import crash
from aquila_npu.weights.load import load_stage_state
from aquila_npu.weights.mapping import Layout


def _dist_opt_file(dp_rank: int) -> str:
    return f"distrib_optim_dp{dp_rank:03d}.pt"


def _shards(optimizer):
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _dist_opt_state(optimizer) -> list:
    """This DP rank's shard of main params and Adam state (megatron-core's bucket-space representation)."""
    states = []
    for opt in _shards(optimizer):
        state = opt.get_parameter_state_dp_reshardable()
        for key, per_dtype in state.items():
            if isinstance(key, int):
                for buckets in per_dtype.values():
                    for bucket in buckets:
                        for elem in bucket:
                            elem["padding"] = False
        states.append(state)
    return states


def _rng_state(device: str) -> dict:
    """Host RNGs, megatron-core's tracker states and the device generator's, tagged with the device that made them
    (their formats differ: CPU Mersenne Twister, CUDA / NPU Philox); as tensors, numbers and strings only
    (weights_only reads them: numpy's own state would need numpy classes on the load allow-list)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"random": random.getstate(),
             "np": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)),
             "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(), "device_type": device}
    if torch.cuda.is_available() and torch.cuda.device_count():  # torch.cuda is torch.npu under transfer_to_npu
        state["device"] = torch.cuda.get_rng_state()
    return state


def _check_rng_device(root: str, state: dict, device: str) -> None:
    # Every RNG state safe_load accepts carries its tag: checkpoints written before the tag (numpy arrays in "np")
    # are refused there, before this check.
    saved = state["device_type"]
    if saved != device:
        raise CheckpointError(
            f"--load {root}: its RNG state was saved on {saved} and this run is on {device}, whose random generators "
            "differ; resume with --no-load-rng (weights, optimizer, scheduler and data position still load; dropout "
            "masks then differ from an uninterrupted run)")


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    name, keys, pos, has_gauss, cached_gaussian = state["np"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "device" in state and torch.cuda.is_available() and torch.cuda.device_count():
        torch.cuda.set_rng_state(state["device"])


def _writes_shared_files(no_shared_storage: bool) -> bool:
    """Rank 0 renames and writes the tracker; without shared storage, the first rank of every node does."""
    if no_shared_storage:
        return int(os.environ.get("LOCAL_RANK", "0")) == 0
    return torch.distributed.get_rank() == 0


class SaveDir:
    """``--save`` claimed for a whole run (collective: every rank calls ``claim``): locked by the rank(s) that write
    the shared files (rank 0; with --no-shared-storage the first rank of every node), with the debris of killed
    runs removed; ``owner`` names this run's staging directories (``owner.debris_name``)."""

    def __init__(self, root: str, owner_tag: str, lock: Optional[owner.Lock], no_shared_storage: bool):
        self.root, self.owner, self.lock, self.no_shared_storage = root, owner_tag, lock, no_shared_storage

    @classmethod
    def claim(cls, root: str, no_shared_storage: bool = False) -> "SaveDir":
        first, lock = _writes_shared_files(no_shared_storage), None

        def take():
            nonlocal lock
            with writing(root, "the checkpoint folder"):
                os.makedirs(root, exist_ok=True)
            lock = owner.claim(root, "--save", debris_dir=root)
            megatron_io.note_unnamed_iterations(root)  # an iteration the tracker does not name: kept, said in a line

        try:
            agreed(take if first else None)
        except UserError:
            if lock is not None:
                lock.release()
            raise
        tags: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(tags, (owner.tag(), owner.HOST, first))
        mine = next(t for t, host, f in tags if f and (not no_shared_storage or host == owner.HOST))
        return cls(root, mine, lock, no_shared_storage)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def _remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _saved_iteration(root: str) -> str:
    try:
        return f"{megatron_io.TRACKER} still names iteration {megatron_io.read_iteration(root)}"
    except CheckpointError:
        return "no earlier checkpoint there"


def save(target: SaveDir, iteration: int, *, model, optimizer, scheduler, layout: Layout,
         params_dtype: torch.dtype, consumed_samples: int, args, use_distributed_optimizer: bool,
         device: str) -> None:
    """Write this rank's files into a staging directory, then (the shared-file writer) put it in place and move the
    tracker. A write error on any rank ends every rank with the same OutputError line, the staging removed."""
    root, name = target.root, f"iter_{iteration:07d}"
    staging = os.path.join(root, owner.debris_name(name, "staging", target.owner))
    final = os.path.join(root, name)
    tp, pp, dp = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                  ps.get_data_parallel_rank())
    first = _writes_shared_files(target.no_shared_storage)
    placed = False

    def fresh():
        _remove(staging)
        with writing(staging, "the checkpoint staging folder"):
            os.makedirs(staging)

    def write():
        rank_dir = os.path.join(staging, megatron_io.rank_dir(iteration, tp, pp, layout.pp))
        if use_distributed_optimizer:  # every DP rank its own shard
            megatron_io.save_file(_dist_opt_state(optimizer), os.path.join(rank_dir, _dist_opt_file(dp)),
                                  "the distributed-optimizer state of one data-parallel rank")
        if dp == 0:
            sd = {k: v for k, v in model.module.state_dict().items() if not k.endswith("_extra_state")}
            extra = {"optimizer": optimizer.state_dict(), "opt_param_scheduler": scheduler.state_dict(),
                     "rng_state": _rng_state(device), "consumed_train_samples": consumed_samples,
                     "training_args": vars(args), "distributed_optimizer": use_distributed_optimizer,
                     "data_parallel_size": ps.get_data_parallel_world_size()}
            megatron_io.save_rank(staging, iteration, layout, pp, tp, sd, params_dtype, extra)
            crash.point("mid-file", os.path.join(rank_dir, "model_optim_rng.pt"))

    def publish():
        nonlocal placed
        crash.point("before-rename")
        existed = os.path.lexists(final)
        with writing(final, "the checkpoint"):
            replace_dir(os.path.join(staging, name), final,
                        os.path.join(root, owner.debris_name(name, "old", target.owner)))
        placed = not existed
        crash.point("before-tracker")
        tmp = os.path.join(root, owner.debris_name(megatron_io.TRACKER, "tmp", target.owner))
        with writing(os.path.join(root, megatron_io.TRACKER), "the tracker file"):
            with open(tmp, "w") as f:
                f.write(str(iteration))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(root, megatron_io.TRACKER))
        _remove(staging)

    for step, mine in ((fresh, first), (write, True), (publish, first)):
        try:
            agreed(step if mine else None)
        except UserError as e:
            if first:
                _remove(staging)
                _remove(os.path.join(root, owner.debris_name(megatron_io.TRACKER, "tmp", target.owner)))
                if placed:
                    _remove(final)
            raise OutputError(f"{e}; the partial checkpoint was removed, {_saved_iteration(root)}") from None
        if step is fresh:
            crash.point("before-data")


def load(info: CheckpointInfo, *, model, optimizer, scheduler, layout: Layout, params_dtype: torch.dtype,
         finetune: bool, no_load_optim: bool, no_load_rng: bool, use_distributed_optimizer: bool,
         device: str) -> Tuple[int, int, str]:
    """Load this rank's shard of the checkpoint ``info`` describes; (iteration, consumed samples, what was loaded).
    An RNG state saved on another device (cpu / cuda / npu) is a ``CheckpointError`` naming ``--no-load-rng``."""
    root, iteration = info.root, info.iteration
    have = info.layout
    if (have.tp, have.pp) != (layout.tp, layout.pp):
        raise CheckpointError(
            f"--load {root} is tp{have.tp}-pp{have.pp}, but this run is tp{layout.tp}-pp{layout.pp}; re-lay it out "
            f"with: {relayout_command(root, layout.tp, layout.pp)}")
    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    ck = agreed(lambda: info.load_rank(tp, pp))
    if not (finetune or no_load_rng) and "rng_state" in ck:  # before anything is loaded
        _check_rng_device(root, ck["rng_state"], device)
    load_stage_state(model.module, {k: v.to(params_dtype) for k, v in ck["model"].items()})
    trained = "optimizer" in ck  # converted checkpoints carry weights only
    if finetune or not trained:
        optimizer.reload_model_params()  # fp32 main weights from the loaded model weights
        return 0, 0, "weights (starting at iteration 0)"
    what = ["weights"]
    if no_load_optim:
        optimizer.reload_model_params()
    else:
        if bool(ck.get("distributed_optimizer")) != use_distributed_optimizer:
            raise CheckpointError(f"--load {root}: saved {'with' if ck.get('distributed_optimizer') else 'without'} "
                                  "--use-distributed-optimizer; pass the same flag, or --no-load-optim")
        optimizer.load_state_dict(ck["optimizer"])
        if ck.get("distributed_optimizer"):
            path = os.path.join(info.rank_path(tp, pp), _dist_opt_file(ps.get_data_parallel_rank()))
            saved_dp = ck.get("data_parallel_size")
            if saved_dp != ps.get_data_parallel_world_size() or not os.path.exists(path):
                raise CheckpointError(f"--load {root}: its distributed-optimizer state was saved by {saved_dp} "
                                      f"data-parallel ranks, this run has {ps.get_data_parallel_world_size()}; "
                                      "use the same number of processes, or --no-load-optim")
            states = agreed(lambda: safe_load.load(path))
            for opt, state in zip(_shards(optimizer), states):
                load_distributed_optimizer_state(opt, state)
        scheduler.load_state_dict(ck["opt_param_scheduler"])
        what.append("optimizer and scheduler")
    if not no_load_rng and "rng_state" in ck:
        _set_rng_state(ck["rng_state"])
        what.append("rng")
    return iteration, int(ck.get("consumed_train_samples", 0)), ", ".join(what)
