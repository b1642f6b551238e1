"""What an evaluation task asks of the model, in one place: log-likelihoods (``Scorer``) and text generation
(``TextGenerator``), both batched.

Generation runs prompts grouped by length (longest first, ``batch_size`` rows per batch) through megatron-core's
static KV cache. A prompt longer than the model allows is left-truncated to ``max_length - max_new_tokens`` tokens
(lm-evaluation-harness's rule for ``generate_until``) and the completion says so. The text of a completion is the
decoded new tokens (special tokens skipped, the EOS not included) cut at the stop strings exactly as lm-eval cuts
them; a row stops generating as soon as its text holds a stop string, which changes no result (the cut text is the
same) and saves the tokens lm-eval would generate and throw away.

All ranks of a model-parallel group make the same calls with the same arguments and get the same results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple


from aquila_npu.evaluation.scoring import _progress
from aquila_npu.inference.generation import TextGenerator
from aquila_npu.inference.options import SamplingParams


@dataclass
class Completion:
    text: str  # decoded, cut at the first stop string
    token_ids: List[int]  # generated ids (without the EOS)
    finish_reason: str  # "eos", "stop" or "length"
    truncated: bool  # the prompt was left-truncated to fit the model


def cut_at_stop_strings(text: str, stop: Sequence[str]) -> str:
    """lm-eval's ``postprocess_generated_text``: split at each stop string in turn, keep what precedes it."""
    for term in stop:
        if term:
            text = text.split(term)[0]
    return text


class ModelRunner:
    """``scorer``: an ``evaluation.scoring.Scorer`` (log-likelihoods, lm-eval's tokenisation); ``generator``: a
    ``TextGenerator`` for the same model (built from the scorer's model when not given); ``batch_size``: generation
    rows per batch (default: the scorer's)."""

    def __init__(self, scorer, generator: Optional[TextGenerator] = None, batch_size: Optional[int] = None,
                 progress: Optional[bool] = None):
        self.scorer = scorer
        self._generator = generator
        self.batch_size = batch_size or scorer.batch_size
        self.progress = scorer.progress if progress is None else progress

    @classmethod
    def of(cls, obj) -> "ModelRunner":
        """``obj`` itself if it is a runner, else a runner around a ``Scorer`` (what ``aquila_npu.evaluate`` passes)."""
        return obj if isinstance(obj, cls) else cls(obj)

    # ---------------------------------------------------------------- what tasks use
    @property
    def tokenizer(self):
        return self.scorer.tokenizer

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    @property
    def eos_id(self) -> Optional[int]:
        return getattr(self.tokenizer, "eos_token_id", None)

    def encode(self, text: str) -> List[int]:
        """lm-eval's ``tok_encode`` (the tokenizer's special tokens unless the text starts with the BOS text)."""
        return self.scorer.encode(text)

    def loglikelihood(self, requests: Sequence[Tuple[str, str]]) -> List[Tuple[float, bool]]:
        return self.scorer.loglikelihood(requests)

    def next_token_logprobs(self, contexts: Sequence[str], token_ids: Sequence[int]) -> List[List[float]]:
        return self.scorer.next_token_logprobs(contexts, token_ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def generator(self) -> TextGenerator:
        if self._generator is None:
            model = self.scorer.model
            self._generator = TextGenerator(model, hidden_size=model.config.hidden_size,
                                            params_dtype=model.config.params_dtype,
                                            vocab_size=self.scorer.vocab_size, padded_vocab=model.vocab_size,
                                            max_sequence_length=self.max_length, device=self.scorer.device)
        return self._generator

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop: Sequence[str] = (),
                 sampling: SamplingParams = SamplingParams(), desc: str = "generating") -> List[Completion]:
        """One completion per prompt (token ids). Rows are batched by length; each row's result is what it would be
        alone (greedy), so batching and data-parallel sharding change nothing."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {max_new_tokens} must be >= 1")
        keep = max(self.max_length - max_new_tokens, 1)
        inputs = [list(p)[-keep:] for p in prompts]
        truncated = [len(p) > keep for p in prompts]
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
        out: List[Optional[Completion]] = [None] * len(inputs)
        stops = [s for s in stop if s]

        def stop_fn(_row, ids):
            text = self.decode(ids)
            return any(s in text for s in stops)

        bar = _progress(len(inputs), desc, unit="ex") if self.progress else None
        for rows in self._batches(order, [len(x) for x in inputs], max_new_tokens):
            gens = self.generator.generate([inputs[i] for i in rows], max_new_tokens, sampling=sampling,
                                           eos_id=self.eos_id, pad_id=self.scorer.pad_id,
                                           stop=stop_fn if stops else None)
            for i, g in zip(rows, gens):
                out[i] = Completion(cut_at_stop_strings(self.decode(g.token_ids), stops), list(g.token_ids),
                                    g.finish_reason, truncated[i])
            if bar is not None:
                bar.update(len(rows))
        if bar is not None:
            bar.close()
        return out  # type: ignore[return-value]

    def _batches(self, order: List[int], lengths: List[int], max_new_tokens: int) -> List[List[int]]:
        """Rows (longest first) in batches of at most ``batch_size``. The static KV-cache loop feeds the tokens by
        which a batch's prompts differ in length one step at a time, so a batch also ends where the next prompt is
        shorter than its first by more than max(max_new_tokens, 32) tokens: the extra steps stay below the steps
        generation takes anyway."""
        slack = max(max_new_tokens, 32)
        batches: List[List[int]] = []
        for i in order:
            if batches and len(batches[-1]) < self.batch_size and lengths[batches[-1][0]] - lengths[i] <= slack:
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches

