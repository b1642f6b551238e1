"""Scoring text with a (possibly tensor/pipeline-parallel) model: log-likelihoods and next-token log-probabilities.

Tokenisation and truncation follow lm-evaluation-harness's ``hf`` model (0.4.x), so the same model gives the same
numbers: ``encode`` is the tokenizer's own ``encode`` (its default special tokens), a context's trailing spaces move
to the continuation, the continuation's ids are those of ``encode(context + continuation)`` after
``encode(context)``, and a sequence longer than the model's maximum length keeps its last tokens. The texts of a call
are tokenised in one batch call of the tokenizer (the same ids as ``encode`` one by one).

Identical inputs run once: BoolQ's " yes" and " no" continue the same context with one token each, so both are read
from one forward pass. Inputs are batched longest first and left-padded; the last pipeline stage computes logits only
at the positions that predict a target (``inference.forward.trailing_logits``: megatron-core's static KV cache keeps
the last position's logits), then log-probabilities in fp32 (logit - logsumexp over the real vocabulary) and
broadcasts them, so every rank gets the results. With attention kernels that ignore padding masks (Transformer
Engine's), batches are right-padded and run whole instead.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from megatron.core import parallel_state as ps

from aquila_npu.inference.forward import forward_logits, left_pad, takes_padding_masks, trailing_logits


@dataclass
class _Input:
    ids: List[int]
    targets: List[Tuple[int, int]]  # (position whose logits predict, token id)


@dataclass
class Scorer:
    """``model``: this rank's stage (full-vocab logits); ``vocab_size``: the real vocabulary; ``max_length``: the
    longest sequence the model takes; ``batch_size``: sequences per forward pass; ``progress``: a progress bar."""

    model: object
    tokenizer: object
    vocab_size: int
    max_length: int
    batch_size: int
    device: object
    pad_id: int = 0
    progress: bool = False
    desc: str = "scoring"

    def __post_init__(self):
        bos = getattr(self.tokenizer, "bos_token_id", None)
        prefix = bos if bos is not None else getattr(self.tokenizer, "eos_token_id", None)
        self._prefix_text = self.tokenizer.decode([prefix]) if prefix is not None else None

    # ---------------------------------------------------------------- tokenisation (lm-evaluation-harness's rules)
    def encode(self, text: str) -> List[int]:
        if self._prefix_text and text.startswith(self._prefix_text):
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """``encode`` of each text, in one tokenizer call per special-token setting (fast tokenizers encode a batch
        in parallel, without a Python round trip per text)."""
        out: List[List[int]] = [[] for _ in texts]
        prefixed = [bool(self._prefix_text) and t.startswith(self._prefix_text) for t in texts]
        for add_special in (True, False):
            idx = [i for i, p in enumerate(prefixed) if p != add_special]
            if idx:
                ids = self.tokenizer([texts[i] for i in idx], add_special_tokens=add_special)["input_ids"]
                for i, e in zip(idx, ids):
                    out[i] = list(e)
        return out

    @staticmethod
    def _split_spaces(context: str, continuation: str) -> Tuple[str, str]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            return context[:-n_spaces], context[-n_spaces:] + continuation
        return context, continuation

    def encode_pair(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        return self.encode_pairs([(context, continuation)])[0]

    def encode_pairs(self, requests: Sequence[Tuple[str, str]]) -> List[Tuple[List[int], List[int]]]:
        """``encode_pair`` of each (context, continuation), every distinct text tokenised once in one batch."""
        pairs = [self._split_spaces(c, x) for c, x in requests]
        texts = list(dict.fromkeys(t for c, x in pairs for t in (c, c + x)))
        ids = dict(zip(texts, self.encode_batch(texts)))
        return [(ids[c], ids[c + x][len(ids[c]):]) for c, x in pairs]

    # ---------------------------------------------------------------- public scores
    def loglikelihood(self, requests: Sequence[Tuple[str, str]]) -> List[Tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding would produce the continuation) for each
        (context, continuation) pair."""
        inputs = []
        if any(not context for context, _ in requests):
            raise ValueError("empty context: not supported")
        for (context, continuation), (ctx, cont) in zip(requests, self.encode_pairs(requests)):
            if not cont:
                raise ValueError(f"continuation {continuation!r} encodes to no tokens")
            ids = (ctx + cont)[-(self.max_length + 1):][:-1]
            first = len(ids) - len(cont)
            inputs.append((ids, [(first + j, t) for j, t in enumerate(cont)]))
        per_target = self._score(inputs)
        return [(sum(lp for lp, _ in r), all(g for _, g in r)) for r in per_target]

    def next_token_logprobs(self, contexts: Sequence[str], token_ids: Sequence[int]) -> List[List[float]]:
        """log p(token | context) of each of ``token_ids`` right after each context (ModelLink's first-token
        scoring)."""
        inputs = []
        for ids in self.encode_batch(contexts):
            ids = ids[-self.max_length:]
            inputs.append((ids, [(len(ids) - 1, t) for t in token_ids]))
        return [[lp for lp, _ in r] for r in self._score(inputs)]

    # ---------------------------------------------------------------- the forward passes
    def _score(self, requests: Sequence[Tuple[List[int], List[Tuple[int, int]]]]) -> List[List[Tuple[float, bool]]]:
        """For each request (input ids, targets), (log-prob, is-argmax) of each target, on every rank."""
        unique: Dict[tuple, _Input] = {}
        where = []  # request -> (unique key, index of its first target)
        for ids, targets in requests:
            key = tuple(ids)
            u = unique.setdefault(key, _Input(list(ids), []))
            where.append((key, len(u.targets)))
            u.targets.extend(targets)
        order = sorted(unique.values(), key=lambda u: -len(u.ids))
        results: Dict[int, torch.Tensor] = {}
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        bar = _progress(len(order), self.desc) if self.progress else None
        for batch in batches:
            for u, r in zip(batch, self._score_batch(batch)):
                results[id(u)] = r
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        scored = []
        for (key, start), (_, targets) in zip(where, requests):
            r = results[id(unique[key])][start:start + len(targets)]
            scored.append([(float(lp), bool(g)) for lp, g in r.tolist()])
        return scored

    def _score_batch(self, batch: List[_Input]) -> List[torch.Tensor]:
        """Per input, a [targets, 2] float64 tensor (log-prob, is-argmax)."""
        n_targets = sum(len(u.targets) for u in batch)
        width = max(len(u.ids) for u in batch)
        if takes_padding_masks(self.model):  # left-padded: the targets' positions are the last ones of every row
            shift = [width - len(u.ids) for u in batch]
            first = min(s + p for s, u in zip(shift, batch) for p, _ in u.targets)
            tokens = torch.tensor(left_pad([u.ids for u in batch], self.pad_id, width), dtype=torch.long)
            logits = trailing_logits(self.model, tokens.to(self.device), torch.tensor(shift).to(self.device),
                                     width - first)
        else:  # right-padded, logits everywhere
            shift, first = [0] * len(batch), 0
            tokens = torch.tensor([u.ids + [self.pad_id] * (width - len(u.ids)) for u in batch], dtype=torch.long)
            logits = forward_logits(self.model, tokens.to(self.device))
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            rows = torch.tensor([i for i, u in enumerate(batch) for _ in u.targets], device=logits.device)
            pos = torch.tensor([shift[i] + p - first for i, u in enumerate(batch) for p, _ in u.targets],
                               device=logits.device)
            tok = torch.tensor([t for u in batch for _, t in u.targets], device=logits.device)
            picked = logits[rows, pos, :self.vocab_size].float()  # [targets, vocab]
            logprob = picked.gather(1, tok[:, None])[:, 0] - torch.logsumexp(picked, dim=-1)
            flat = torch.stack([logprob.double(), (picked.argmax(-1) == tok).double()], dim=1)
        else:
            flat = torch.empty(n_targets, 2, dtype=torch.float64, device=self.device)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.broadcast(flat, src=ps.get_pipeline_model_parallel_last_rank(),
                                        group=ps.get_pipeline_model_parallel_group())
        return list(flat.cpu().split([len(u.targets) for u in batch]))


def _progress(total: int, desc: str, unit: str = "seq"):
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, mininterval=0.5 if tty else 15.0,
                dynamic_ncols=tty)
