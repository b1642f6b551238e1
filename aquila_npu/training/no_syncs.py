"""``--no-step-syncs``: a training step that never waits for the device on the host (issue 28).

Without it one step of megatron-core's schedule and optimizer reads three values on the host (counted in
tests/test_training_speed.py): the token count in ``finalize_model_grads`` (``if num_tokens > 0``), the gradient norm
(``get_grad_norm_fp32``'s ``.item()``, and the clipping's ``if clip_coeff < 1.0``) and our loss for the log line.
With it:

* ``finalize_model_grads_on_device`` (given to megatron-core through its public ``finalize_model_grads_func`` hook):
  megatron-core's own function without the token count, then the same broadcast / all-reduce of the count and the
  scaling by 1 / max(count, 1) as a device tensor (no tokens: the gradients are zero, multiplied by 1);
* the optimizers' gradient norm and clipping on the device (``compat.megatron_core.optimizer_step_without_host_syncs``);
* ``train_step(sync=False)``: the loss, its token count and the gradient norm stay device tensors; the loop reads them
  in one copy after the step (``step.host_values``), where it waits for the device anyway to time the step.

fp16 is refused: its loss scaler reads the found-inf flag on the host every step.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.distributed.finalize_model_grads import finalize_model_grads

from aquila_npu.compat.megatron_core import optimizer_step_without_host_syncs


def finalize_model_grads_on_device(model: List[torch.nn.Module], num_tokens: Optional[torch.Tensor] = None,
                                   pg_collection=None, force_all_reduce: Optional[bool] = False) -> None:
    finalize_model_grads(model, None, pg_collection=pg_collection, force_all_reduce=force_all_reduce)
    if num_tokens is None:
        return
    if pg_collection is not None:
        pp_group, dp_cp_group = pg_collection.pp, pg_collection.dp_cp
        last = torch.distributed.get_global_rank(pp_group, torch.distributed.get_world_size(pp_group) - 1)
    else:
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        last = parallel_state.get_pipeline_model_parallel_last_rank()
    torch.distributed.broadcast(num_tokens, src=last, group=pp_group)  # the count exists on the last stage only
    torch.distributed.all_reduce(num_tokens, group=dp_cp_group)
    scaling = 1.0 / num_tokens.clamp(min=1)
    for chunk in model:
        chunk.scale_gradients(scaling)


def install(tcfg) -> None:
    """The sync-free finalize and optimizer for a run built with ``tcfg`` (megatron-core's TransformerConfig)."""
    tcfg.finalize_model_grads_func = finalize_model_grads_on_device
    optimizer_step_without_host_syncs()
