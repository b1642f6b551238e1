"""megatron-core model-parallel state for one process."""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

import torch
from megatron.core import parallel_state, tensor_parallel

from aquila_npu.errors import UserError

T = TypeVar("T")


def initialize_model_parallel(tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, seed: int = 1234) -> None:
    """Create megatron-core's tensor/pipeline/data-parallel groups and seed its RNG tracker (torch.distributed must
    be initialised: see ``aquila_npu.device.setup``)."""
    world = torch.distributed.get_world_size()
    if world % (tensor_parallel_size * pipeline_parallel_size):
        raise ValueError(f"world size {world} is not divisible by tensor ({tensor_parallel_size}) x pipeline "
                         f"({pipeline_parallel_size}) parallel sizes")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel_size,
                                             pipeline_model_parallel_size=pipeline_parallel_size)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def agreed(step: Optional[Callable[[], T]]) -> Optional[T]:
    """Collective: run ``step`` on this rank (None: nothing to do here); when it raises a ``UserError`` on any rank,
    every rank raises the first such error (one line everywhere, no rank left waiting in a collective)."""
    error, result = None, None
    try:
        result = step() if step is not None else None
    except UserError as e:
        error = e
    errors: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return result
