"""Autoregressive generation with megatron-core's static KV cache, any tensor/pipeline-parallel layout.

The model is never changed: each step calls megatron-core's ``GPTInferenceWrapper`` (which sends hidden states
stage to stage for pipeline parallelism) with a ``StaticInferenceContext`` that holds every layer's keys and values,
so a decoding step runs one position through the network and computes logits for that position only.

Prompts of a batch are left-padded, as Hugging Face does: one prefill runs every prompt whole, then each step feeds
the token just chosen for every row, so a batch takes (new tokens) forward passes whatever its prompt lengths.
Padding positions are masked for real tokens (``inference.forward.padding_mask``); rotary embeddings depend on
position differences only, so a padded row computes what it would alone (up to rounding; greedy output equals HF's
token for token). Where the attention kernel cannot take a padding mask (Transformer Engine's causal kernels), the
batch follows megatron-core's static-batch algorithm instead: right padding, a prefill over the shortest prompt, then
one position per row and step (the row's own prompt token while it lasts). The last pipeline stage picks the next
tokens (tensor-parallel rank 0's choice is broadcast to its TP group) and broadcasts them to the other stages, so
every rank holds the same tokens; they come to the host (one device sync per step) only when an EOS id, a callback or
a stop rule reads them.

All ranks of a model-parallel group call ``generate`` with the same prompts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
from megatron.core import parallel_state as ps

from aquila_npu.errors import PromptTooLong
from aquila_npu.inference.forward import inference_wrapper, left_pad, padding_mask, takes_padding_masks
from aquila_npu.inference.sampling import SamplingParams, sample


@dataclass
class Generation:
    """The result for one prompt. ``token_ids``: generated ids only (without the EOS that stopped it)."""

    prompt_ids: List[int]
    token_ids: List[int] = field(default_factory=list)
    finish_reason: str = "length"  # "eos", "stop" (the ``stop`` callback) or "length"


@dataclass
class GenerationStats:
    generated_tokens: int = 0  # tokens kept in the results (what a user sees)
    steps: int = 0  # forward passes
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0


TokenCallback = Callable[[int, int], None]  # (row index in the batch, token id); called on every rank
# (row index in the batch, the row's generated ids so far) -> stop this row now; called on every rank (all ranks hold
# the same tokens, so they decide alike). Evaluation uses it for stop strings (lm-eval's ``until``).
StopCallback = Callable[[int, List[int]], bool]


def _broadcast_next_tokens(next_tokens: Optional[torch.Tensor], batch: int, device) -> torch.Tensor:
    """The last stage's choice, on every rank: TP rank 0's within the last stage, then last stage -> other stages."""
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    if last and ps.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.broadcast(next_tokens, src=ps.get_tensor_model_parallel_src_rank(),
                                    group=ps.get_tensor_model_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        if not last:
            next_tokens = torch.empty(batch, dtype=torch.long, device=device)
        torch.distributed.broadcast(next_tokens, src=ps.get_pipeline_model_parallel_last_rank(),
                                    group=ps.get_pipeline_model_parallel_group())
    return next_tokens


@dataclass
class TextGenerator:
    """Generation for one loaded model stage (``from_loaded``: from ``checkpoint.load_model.LoadedModel``).

    ``model``: this rank's GPTModel stage (``parallel_output=False``); ``vocab_size``: the real vocabulary (logits of
    the padded entries are never chosen); ``max_sequence_length``: prompt + generated tokens at most.
    """

    model: torch.nn.Module
    hidden_size: int
    params_dtype: torch.dtype
    vocab_size: int
    padded_vocab: int
    max_sequence_length: int
    device: torch.device

    @classmethod
    def from_loaded(cls, loaded, device: torch.device, max_sequence_length: Optional[int] = None) -> "TextGenerator":
        """``max_sequence_length`` defaults to (and is capped at) the model's max_position_embeddings."""
        spec = loaded.spec
        return cls(loaded.model, hidden_size=spec.hidden_size, params_dtype=loaded.params_dtype,
                   vocab_size=spec.vocab_size, padded_vocab=loaded.padded_vocab,
                   max_sequence_length=min(max_sequence_length or spec.max_position_embeddings,
                                           spec.max_position_embeddings), device=device)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
                 eos_id: Optional[int] = None, pad_id: int = 0, use_kv_cache: bool = True,
                 on_token: Optional[TokenCallback] = None, stats: Optional[GenerationStats] = None,
                 stop: Optional[StopCallback] = None) -> List[Generation]:
        """Generate up to ``max_new_tokens`` for each prompt (a batch), stopping each row at ``eos_id`` or when
        ``stop`` says so (finish_reason "stop").

        ``use_kv_cache=False`` recomputes the whole sequence at every step (the benchmark's baseline).
        A batch takes at most ``max_sequence_length`` positions: the longest prompt plus the generated tokens
        (finish_reason "length" when a row reaches it).
        """
        if not prompts:
            return []
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {max_new_tokens} must be >= 1")
        lengths = [len(p) for p in prompts]
        if min(lengths) < 1:
            raise ValueError("empty prompt: at least one token is needed")
        if max(lengths) >= self.max_sequence_length:
            raise PromptTooLong(f"a prompt of {max(lengths)} tokens leaves no room for generation within the maximum "
                                f"sequence length {self.max_sequence_length}")
        b, width = len(prompts), max(lengths)
        total = min(width + max_new_tokens, self.max_sequence_length)
        left = takes_padding_masks(self.model)
        # Where each row's prompt starts (left padding) and where its first generated token goes.
        pad = [width - n for n in lengths] if left else [0] * b
        first_new = [width] * b if left else lengths
        rows = left_pad(prompts, pad_id) if left else prompts
        tokens = torch.tensor([list(r) + [pad_id] * (total - len(r)) for r in rows], dtype=torch.long).to(self.device)
        positions = torch.arange(total, device=self.device).unsqueeze(0).expand(b, -1)
        padded = left and any(pad)
        pad_t = torch.tensor(pad, device=self.device)
        key_is_pad = torch.arange(total, device=self.device).unsqueeze(0) < pad_t.unsqueeze(1)  # [b, total]
        first_new_t = None if left else torch.tensor(first_new, device=self.device)
        # The chosen ids come to the host every step only when something reads them there (a device sync).
        host = eos_id is not None or on_token is not None or stop is not None
        generated: List[List[int]] = [[] for _ in range(b)]
        counts = [0] * b
        finish = ["length"] * b
        done = [False] * b
        generator = torch.Generator().manual_seed(sampling.seed)
        wrapper = inference_wrapper(self.model, b, total, self.padded_vocab)
        context = wrapper.inference_context
        last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        start, end = 0, min(first_new)
        t0 = time.perf_counter()
        while True:
            if not use_kv_cache:
                context.reset()
                start = 0
            mask = None
            if padded:
                mask = padding_mask(pad_t, start, end) if end - start > 1 else key_is_pad[:, None, None, :end]
            logits = wrapper.run_one_forward_step({"tokens": tokens[:, start:end], "position_ids": positions[:, start:end],
                                                   "attention_mask": mask})
            next_tokens = None
            if last_stage:
                last = logits[:, -1, :self.vocab_size]
                next_tokens = sample(last.cpu() if not sampling.greedy else last, sampling, generator).to(self.device)
            next_tokens = _broadcast_next_tokens(next_tokens, b, self.device)
            if stats is not None:
                stats.steps += 1
            # Rows past their prompt take the new token; the others keep their next prompt token.
            tokens[:, end] = next_tokens if left else torch.where(first_new_t <= end, next_tokens, tokens[:, end])
            chosen = next_tokens.tolist() if host else None
            for i in range(b):
                if done[i] or first_new[i] > end:
                    continue
                if chosen is not None and chosen[i] == eos_id:
                    done[i], finish[i] = True, "eos"
                    continue
                counts[i] += 1
                if chosen is not None:
                    generated[i].append(chosen[i])
                    if on_token is not None:
                        on_token(i, chosen[i])
                    if stop is not None and stop(i, generated[i]):
                        done[i], finish[i] = True, "stop"
                        continue
                if counts[i] >= max_new_tokens:
                    done[i] = True
            if all(done) or end + 1 >= total:
                break
            if use_kv_cache and all(f <= end for f in first_new):
                context.enable_decode_mode()
            start, end = end, end + 1
        ids = tokens.tolist()
        results = [Generation(prompt_ids=list(p), token_ids=ids[i][first_new[i]:first_new[i] + counts[i]],
                              finish_reason=finish[i]) for i, p in enumerate(prompts)]
        if stats is not None:
            stats.seconds += time.perf_counter() - t0
            stats.generated_tokens += sum(counts)
        return results

