"""What the layout planner (``aquila_npu.planning``) expects this run to need per device, printed at start before
anything is allocated, with a warning when it will not fit the device."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from aquila_npu.planning import devices
from aquila_npu.planning.memory import StageMemory, estimate
from aquila_npu.planning.runs import from_flags, start_line
from aquila_npu.training.config import RunConfig


def _plan(args, cfg: RunConfig, device: str):
    return from_flags(args, cfg.spec, data_parallel_size=cfg.data_parallel_size, seq_length=cfg.seq_length,
                      global_batch_size=cfg.global_batch_size,
                      make_vocab_size_divisible_by=cfg.layout.make_vocab_size_divisible_by, device=device)


def stages(args, cfg: RunConfig, device: str) -> List[StageMemory]:
    """The plan of this run's stages (without the device's buffers and reserve: what torch's allocator hands out)."""
    return estimate(*_plan(args, cfg, device))


def device_capacity(dev) -> Tuple[Optional[int], str, Optional[devices.Device]]:
    """(bytes one process may allocate or None, the device's name, the planner's device) of the device in use."""
    if dev.name == "cpu":
        return None, "the CPU", None
    try:
        name = torch.cuda.get_device_name()  # (torch.npu under transfer_to_npu)
        capacity = int(torch.cuda.get_device_properties(dev.torch_device).total_memory) or None
    except Exception:  # a runtime that cannot say (the tests' fake NPU): the table's figure, if the name is known
        name, capacity = dev.name, None
    device = devices.lookup(name)
    if capacity is None and device is not None:
        capacity = device.usable_bytes
    if device is None:
        device = devices.custom(capacity / devices.GIB if capacity else 0.0, kind=dev.name)
    return capacity, name, device


def announce(args, cfg: RunConfig, dev, say, *, device_kind: Optional[str] = None, capacity: Optional[int] = None,
             label: Optional[str] = None) -> None:
    """``say`` (rank 0's print) the plan's line; a warning when the fullest stage will not fit the device.
    ``device_kind`` / ``capacity`` / ``label`` instead of ``dev``'s: a device described without one."""
    device = None
    if dev is not None:
        device_kind = dev.name
        capacity, label, device = device_capacity(dev)
    elif capacity is not None:
        device = devices.custom(capacity / devices.GIB, kind=device_kind or "npu")
    work, par = _plan(args, cfg, device_kind or "cpu")
    line, fits = start_line(estimate(work, par, device), capacity, label or "the CPU")
    say(line)
    if fits is False:
        model = f"--load {args.load}" if cfg.checkpoint is not None else f"--model {cfg.spec.name}"
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        say(f"warning: the plan expects more memory than the device has: this layout will likely run out of memory; "
            f"python -m aquila_npu.plan {model} --device-memory-gb {capacity / devices.GIB:.1f} --nproc-per-node "
            f"{world} --seq-length {cfg.seq_length} --global-batch-size {cfg.global_batch_size} --{work.dtype} lists "
            "the layouts that fit")
