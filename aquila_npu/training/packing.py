"""Sequences holding several documents (packed instruction samples, or pretraining documents split at EOD with
``--reset-attention-mask``): megatron-core's packed-sequence form, so that attention stays within each document and
rotary positions restart at each.

A micro-batch carries ``document_ids`` [b, s] (a number per token, changing where a document starts; padding is a
document of its own). ``fold`` flattens the micro-batch to one sequence of b * s tokens ([1, b*s]: megatron-core's
``thd`` format has a batch of one) and ``packed_params`` describes its documents: cumulative boundaries
``cu_seqlens`` (with the leading 0, as megatron-core's rotary embedding and Transformer Engine take them), the longest
document (megatron-core's thd rotary embedding restarts positions for each document when this is shorter than the
whole: a single document as long as the fold starts at position 0 either way), and the lengths as Python ints for
the attention modules that loop over documents or pass them to a kernel (``npu_fusion_attention``'s
``actual_seq_qlen``): computed once per micro-batch, not in every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
from megatron.core.packed_seq_params import PackedSeqParams

DOCUMENT_IDS = "document_ids"


@dataclass
class PackedDocuments(PackedSeqParams):
    """megatron-core's ``PackedSeqParams`` (``thd``) plus the documents' lengths as Python ints."""

    lengths: Tuple[int, ...] = ()


def document_lengths(document_ids: torch.Tensor) -> Tuple[int, ...]:
    """Lengths of the runs of equal ids along each row of [b, s] ``document_ids``, rows one after the other."""
    b, s = document_ids.shape
    ids = document_ids.reshape(-1)
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[1:] = ids[1:] != ids[:-1]
    starts[::s] = True  # each row starts a document
    first = torch.nonzero(starts).reshape(-1).tolist() + [b * s]
    return tuple(e - a for a, e in zip(first[:-1], first[1:]))


def packed_params(document_ids: torch.Tensor, device) -> PackedDocuments:
    lengths = document_lengths(document_ids.cpu())
    cu = torch.tensor((0,) + tuple(_cumsum(lengths)), dtype=torch.int32, device=device)
    longest = max(lengths)
    return PackedDocuments(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest, lengths=lengths)


def _cumsum(lengths):
    total = 0
    for n in lengths:
        total += n
        yield total


def fold(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """[b, s] tensors as [1, b * s]: the micro-batch as one packed sequence."""
    return {k: v.reshape(1, -1) for k, v in batch.items()}
