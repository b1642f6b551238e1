"""Forward passes through a (possibly pipeline-parallel) model with megatron-core's schedules."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor


def forward_logits(model, tokens: Tensor, position_ids: Optional[Tensor] = None,
                   attention_mask: Optional[Tensor] = None) -> Optional[Tensor]:
    """Logits [b, s, vocab] of one batch on the last pipeline stage; None on the other stages.

    ``model`` is this rank's stage (built with ``parallel_output=False`` for full-vocab logits). Every rank passes
    the same ``tokens`` (stages other than the first only use their shape).
    """
    b, s = tokens.shape
    if position_ids is None:
        position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, -1)
    store = {}

    def step(data_iterator, stage):
        out = stage(tokens, position_ids, attention_mask)

        def collect(output):
            store["logits"] = output
            return output.new_zeros(()), {}

        return out, collect

    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=step, data_iterator=None, model=[model], num_microbatches=1, seq_length=s,
            micro_batch_size=b, forward_only=True,
        )
    return store.get("logits") if parallel_state.is_pipeline_last_stage() else None
