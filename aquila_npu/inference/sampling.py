"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from aquila_npu.inference.options import SamplingParams  # noqa: F401 - its home is inference.options


def filter_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """Temperature, top-k and top-p applied to [b, vocab] fp32 logits (removed tokens get -inf)."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cumulative <= 1 - params.top_p
        remove_sorted[..., -1:] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample(logits: Tensor, params: SamplingParams, generator: Optional[torch.Generator] = None) -> Tensor:
    """Next token ids [b] (int64) from [b, vocab] logits (only the real vocabulary: slice off padding first)."""
    logits = logits.float()
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, params).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
