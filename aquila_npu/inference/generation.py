"""Autoregressive generation with megatron-core's static KV cache, any tensor/pipeline-parallel layout.

The model is never changed: each step calls megatron-core's ``GPTInferenceWrapper`` (which sends hidden states
stage to stage for pipeline parallelism) with a ``StaticInferenceContext`` that holds every layer's keys and values,
so a decoding step runs one position through the network. The loop is megatron-core's static-batch algorithm
(``TextGenerationController.generate_all_output_tokens_static_batch``): prompts are right-padded, the prefill covers
the shortest prompt, and each later step feeds one position for every row: the row's own prompt token while its
prompt lasts, the token just generated after that. Every row therefore sees its tokens at positions 0, 1, ... with
no padding in between: the same computation as one prompt alone (and as Hugging Face with left padding and an
attention mask). The last pipeline stage picks the next tokens (tensor-parallel rank 0's choice is broadcast to its
TP group) and broadcasts them to the other stages, so every rank holds the same tokens.

All ranks of a model-parallel group call ``generate`` with the same prompts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
from megatron.core import parallel_state as ps
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig

from aquila_npu.errors import PromptTooLong
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

    def _wrapper(self, batch: int, total: int) -> GPTInferenceWrapper:
        cfg = InferenceWrapperConfig(hidden_size=self.hidden_size, params_dtype=self.params_dtype,
                                     inference_batch_times_seqlen_threshold=-1, padded_vocab_size=self.padded_vocab,
                                     inference_max_requests=batch, inference_max_seq_length=total)
        context = StaticInferenceContext(batch, total)
        wrapper = GPTInferenceWrapper(self.model, cfg, context)
        wrapper.prep_model_for_inference()
        return wrapper

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
                 eos_id: Optional[int] = None, pad_id: int = 0, use_kv_cache: bool = True,
                 on_token: Optional[TokenCallback] = None, stats: Optional[GenerationStats] = None,
                 stop: Optional[StopCallback] = None) -> List[Generation]:
        """Generate up to ``max_new_tokens`` for each prompt (a batch), stopping each row at ``eos_id`` or when
        ``stop`` says so (finish_reason "stop").

        ``use_kv_cache=False`` recomputes the whole sequence at every step (the benchmark's baseline).
        Rows are limited to ``max_sequence_length`` tokens in all (finish_reason "length").
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
        b = len(prompts)
        total = min(max(lengths) + max_new_tokens, self.max_sequence_length)
        tokens = torch.full((b, total), pad_id, dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = torch.tensor(list(p), dtype=torch.long)
        prompt_len = torch.tensor(lengths, device=self.device)
        positions = torch.arange(total, device=self.device).unsqueeze(0).expand(b, -1)
        results = [Generation(prompt_ids=list(p)) for p in prompts]
        done = [False] * b
        generator = torch.Generator().manual_seed(sampling.seed)
        wrapper = self._wrapper(b, total)
        context = wrapper.inference_context
        last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        start, end = 0, min(lengths)
        t0 = time.perf_counter()
        while True:
            if not use_kv_cache:
                context.reset()
                start = 0
            logits = wrapper.run_one_forward_step({"tokens": tokens[:, start:end], "position_ids": positions[:, start:end],
                                                   "attention_mask": None})
            next_tokens = None
            if last_stage:
                last = logits[:, -1, :self.vocab_size]
                next_tokens = sample(last.cpu() if not sampling.greedy else last, sampling, generator).to(self.device)
            next_tokens = _broadcast_next_tokens(next_tokens, b, self.device)
            if stats is not None:
                stats.steps += 1
            started = (prompt_len <= end).tolist()
            chosen = next_tokens.tolist()
            for i in range(b):
                if done[i] or not started[i]:
                    continue
                tok = chosen[i]
                tokens[i, end] = tok
                if eos_id is not None and tok == eos_id:
                    done[i], results[i].finish_reason = True, "eos"
                    continue
                results[i].token_ids.append(tok)
                if on_token is not None:
                    on_token(i, tok)
                if stop is not None and stop(i, results[i].token_ids):
                    done[i], results[i].finish_reason = True, "stop"
                elif len(results[i].token_ids) >= max_new_tokens:
                    done[i] = True
            if all(done):
                break
            if all(started):
                context.enable_decode_mode()
            start, end = end, end + 1
            if end >= total:
                break
        if stats is not None:
            stats.seconds += time.perf_counter() - t0
            stats.generated_tokens += sum(len(r.token_ids) for r in results)
        return results
