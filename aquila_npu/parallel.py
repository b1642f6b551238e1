"""megatron-core model-parallel state for one process."""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel


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
