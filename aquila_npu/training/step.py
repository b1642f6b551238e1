"""One training (or evaluation) iteration on megatron-core's schedules: forward step, loss, optimizer step."""

from __future__ import annotations

from typing import Iterator

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from aquila_npu.training.packing import DOCUMENT_IDS, fold, packed_params

LOSS_KEY = "lm loss"


def masked_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor):
    """Cross entropy summed over the tokens whose loss counts, their number, and the (sum, count) pair reported.

    megatron-core's schedule (``calculate_per_token_loss``) adds the counts over micro-batches and data-parallel
    ranks and divides the gradients by the total, so the loss is the mean over all counted tokens of the batch.
    """
    mask = loss_mask.reshape(-1).float()
    total = (per_token_loss.reshape(-1).float() * mask).sum()
    count = mask.sum()
    return total, count.to(torch.int), {LOSS_KEY: torch.stack([total.detach(), count])}


def forward_step(data_iterator: Iterator[dict], model):
    batch = next(data_iterator)
    device = next(model.parameters()).device
    packed = None
    if DOCUMENT_IDS in batch:  # several documents per sequence: one packed sequence of b * s tokens
        packed = packed_params(batch[DOCUMENT_IDS], device)
        batch = fold({k: v for k, v in batch.items() if k != DOCUMENT_IDS})
    tokens, labels, position_ids = (batch[k].to(device, non_blocking=True)
                                    for k in ("tokens", "labels", "position_ids"))
    loss_mask = batch["loss_mask"].to(device, non_blocking=True)
    attention_mask = batch.get("attention_mask")
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    # per-token loss [b, s] on the last stage ([1, b * s] packed)
    # (loss_mask: read by the chunked loss, models/chunked_loss.py; megatron-core's own loss ignores it)
    output = model(tokens, position_ids, attention_mask, labels=labels, packed_seq_params=packed, loss_mask=loss_mask)

    def loss_func(per_token_loss):
        return masked_loss(per_token_loss, loss_mask)

    return output, loss_func


def _reduce_loss(outputs, host: bool = True):
    """(mean loss, counted tokens) of this iteration over micro-batches and data-parallel ranks; on every rank of
    the last pipeline stage (others get nan). ``host=False``: both as device tensors (no host sync)."""
    if not parallel_state.is_pipeline_last_stage():
        return float("nan"), 0.0
    pair = torch.stack([o[LOSS_KEY] for o in outputs]).sum(0) if outputs else torch.zeros(2)
    pair = pair.float()
    torch.distributed.all_reduce(pair, group=parallel_state.get_data_parallel_group())
    if not host:
        return pair[0] / pair[1].clamp(min=1.0), pair[1]
    total, count = pair.tolist()
    return total / max(count, 1.0), count


def host_values(out: dict) -> dict:
    """A ``train_step(sync=False)`` result with its device tensors read (one sync, at the step's end)."""
    if not any(isinstance(v, torch.Tensor) for v in out.values()):
        return out
    vals = [v for v in (out["lm_loss"], out["loss_tokens"], out["grad_norm"]) if isinstance(v, torch.Tensor)]
    read = iter(torch.stack([v.float().reshape(()) for v in vals]).tolist())
    return {**out, **{k: next(read) for k in ("lm_loss", "loss_tokens", "grad_norm")
                      if isinstance(out[k], torch.Tensor)}}


def train_step(data_iterator, model, optimizer, scheduler, *, num_microbatches: int, seq_length: int,
               micro_batch_size: int, global_batch_size: int, sync: bool = True) -> dict:
    """One iteration. ``sync=False`` (``--no-step-syncs``): the loss, token count and gradient norm stay device
    tensors (``host_values()`` reads them after the step)."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data_iterator, model=[model],
        num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=False)
    with torch.profiler.record_function("aquila:optimizer"):  # (the step profile's marker; no cost unprofiled)
        update_successful, grad_norm, _ = optimizer.step()
    if update_successful:
        scheduler.step(increment=global_batch_size)
    loss, tokens = _reduce_loss(outputs, sync)
    if sync and grad_norm is not None:
        grad_norm = float(grad_norm)
    return {"lm_loss": loss, "loss_tokens": tokens, "grad_norm": grad_norm, "skipped": not update_successful}


def eval_step(data_iterator, model, *, num_microbatches: int, seq_length: int, micro_batch_size: int) -> float:
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data_iterator, model=[model],
        num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=True)
    return _reduce_loss(outputs)[0]
