"""Forward passes through a (possibly pipeline-parallel) model: megatron-core's training schedule for full logits
(``forward_logits``), and its inference wrapper with a static KV cache for left-padded batches whose logits are
wanted at the last positions only (``trailing_logits``; ``inference_wrapper`` and ``padding_mask`` are shared with
generation).

Left padding: row i's tokens sit at positions ``pad[i]..width-1``. megatron-core's rotary embedding rotates by
position in the batch, so a padded row's tokens are rotated by ``pad[i]`` more than they would be alone; attention
scores depend only on the difference of two positions, so the result is the same up to rounding. A padding position
is never seen by a real token (``padding_mask``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config
from torch import Tensor

from aquila_npu.device.torch_modules import CoreAttentionBase


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


def takes_padding_masks(model) -> bool:
    """Whether every core attention of this stage applies an explicit attention mask in a prefill (ours do;
    Transformer Engine's causal kernels ignore it). Every stage has the same backend, so every rank agrees."""
    return all(isinstance(m, CoreAttentionBase) for name, m in model.named_modules() if name.endswith("core_attention"))


def inference_wrapper(model, batch: int, total: int, padded_vocab: Optional[int] = None) -> GPTInferenceWrapper:
    """megatron-core's inference wrapper around ``model`` with a fresh static KV cache for ``batch`` rows of up to
    ``total`` positions (allocated by the attention layers on first use). ``padded_vocab`` only sizes the logits of
    megatron-core's micro-batched pipeline path, which this wrapper never takes (no batch x length threshold)."""
    config = get_model_config(model)
    cfg = InferenceWrapperConfig(hidden_size=config.hidden_size, params_dtype=config.params_dtype,
                                 inference_batch_times_seqlen_threshold=-1, padded_vocab_size=padded_vocab or 1,
                                 inference_max_requests=batch, inference_max_seq_length=total)
    wrapper = GPTInferenceWrapper(model, cfg, StaticInferenceContext(batch, total))
    wrapper.prep_model_for_inference()
    return wrapper


def padding_mask(pad: Tensor, start: int, end: int) -> Tensor:
    """[b, 1, end - start, end] boolean mask, True = masked, for the queries at positions start..end-1 of
    left-padded rows (row i has ``pad[i]`` padding positions first): causal, and no real token sees padding (a
    padding position sees the padding before it, so no query is left with nothing to attend to)."""
    q = torch.arange(start, end, device=pad.device).unsqueeze(0)  # [1, sq]
    k = torch.arange(end, device=pad.device)
    causal = k.unsqueeze(0) > q.transpose(0, 1)  # [sq, sk]
    hidden = (k.unsqueeze(0) < pad.unsqueeze(1)).unsqueeze(1) & (q >= pad.unsqueeze(1)).unsqueeze(2)  # [b, sq, sk]
    return (causal.unsqueeze(0) | hidden).unsqueeze(1)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, width: Optional[int] = None) -> list:
    """Each row preceded by ``pad_id`` up to ``width`` (default: the longest row)."""
    width = width or max(len(r) for r in rows)
    return [[pad_id] * (width - len(r)) + list(r) for r in rows]


@torch.inference_mode()
def trailing_logits(model, tokens: Tensor, pad: Tensor, n_last: int) -> Optional[Tensor]:
    """Logits [b, n_last, vocab] at the last ``n_last`` positions of left-padded ``tokens`` [b, s] (row i padded
    with ``pad[i]`` positions) on the last pipeline stage; None on the other stages.

    The output layer runs on those positions only: megatron-core's static KV cache keeps the last position's logits
    of a forward pass, so the first s - n_last + 1 positions go in one pass (its logits are those of position
    s - n_last) and, when n_last > 1, the remaining positions in a second pass that keeps all of its logits.
    """
    b, s = tokens.shape
    if not 1 <= n_last <= s:
        raise ValueError(f"n_last {n_last} must be in 1..{s}")
    wrapper = inference_wrapper(model, b, s)
    context = wrapper.inference_context
    positions = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, -1)
    split = s - n_last + 1
    padded = bool((pad > 0).any())
    first = wrapper.run_one_forward_step({"tokens": tokens[:, :split], "position_ids": positions[:, :split],
                                         "attention_mask": padding_mask(pad, 0, split) if padded else None})
    if n_last == 1:
        return first
    context.materialize_only_last_token_logits = False
    # After the first pass megatron-core no longer applies a causal mask itself: this one is always explicit.
    rest = wrapper.run_one_forward_step({"tokens": tokens[:, split:], "position_ids": positions[:, split:],
                                        "attention_mask": padding_mask(pad, split, s)})
    return None if first is None else torch.cat([first, rest], dim=1)
