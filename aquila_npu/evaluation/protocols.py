"""The ways a task asks the model, shared by every task: lm-evaluation-harness's ``multiple_choice`` and
``generate_until`` and ModelLink's greedy generation, plus lm-eval's filters and ``exact_match``.

lm-eval (0.4.13):

* ``multiple_choice``: log p(target_delimiter + choice | context) for every choice, all of a document's requests in
  one batch with everyone else's (the ``Scorer`` runs identical inputs once, so " A" .. " D" after one context cost
  one forward pass); ``acc`` = argmax == gold, ``acc_norm`` = argmax of log-likelihood / len(choice) (first maximum
  on ties, as numpy's argmax);
* ``generate_until``: greedy, the context encoded as lm-eval's ``tok_batch_encode`` does (the tokenizer's special
  tokens) and left-truncated to ``max_length - max_gen_toks``; stop strings ``until`` plus the EOS text; the text cut
  at them (``runner.cut_at_stop_strings``).

ModelLink (MindSpeed-LLM ``evaluation.py``, ``LLMChat.chat``): the prompt is ``tokenizer.encode(prompt)`` (with
``--prompt-type`` the prompt as one user turn of that chat template; or, when the tokenizer has a chat template and
``--no-chat-template`` is not given, ``tokenizer.apply_chat_template`` of one user message), greedy decoding of
``--max-new-tokens`` tokens stopped only by the EOS, the new tokens decoded with special tokens skipped.
"""

from __future__ import annotations

import re
import string
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from aquila_npu.errors import UsageError
from aquila_npu.evaluation.tasks import Task
from aquila_npu.inference.options import SamplingParams

if TYPE_CHECKING:  # annotations only: the runner imports torch and megatron-core
    from aquila_npu.evaluation.runner import Completion, ModelRunner

INVALID = "[invalid]"  # lm-eval's RegexFilter fallback


# ---------------------------------------------------------------- lm-eval: multiple choice
def choice_loglikelihoods(runner: ModelRunner, contexts: Sequence[str], choices: Sequence[Sequence[str]],
                          delimiter: str = " ") -> List[List[float]]:
    """log p(delimiter + choice | context) for every choice of every document, in one batched call."""
    requests = [(ctx, delimiter + c) for ctx, cs in zip(contexts, choices) for c in cs]
    lls = runner.loglikelihood(requests)
    out, k = [], 0
    for cs in choices:
        out.append([ll for ll, _ in lls[k:k + len(cs)]])
        k += len(cs)
    return out


def argmax(values: Sequence[float]) -> int:
    """numpy's argmax: the first maximum."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def multiple_choice_metrics(lls: Sequence[float], choices: Sequence[str], gold: Sequence[int]) -> Dict[str, float]:
    """lm-eval's acc and acc_norm (length = the choice's characters, without the delimiter) of one document;
    ``gold``: the correct choice indices (AGIEval's multi-answer rows have several)."""
    norm = [ll / float(len(c)) for ll, c in zip(lls, choices)]
    return {"acc": float(argmax(lls) in gold), "acc_norm": float(argmax(norm) in gold)}


# ---------------------------------------------------------------- generation
def lm_eval_generate(runner: ModelRunner, contexts: Sequence[str], until: Sequence[str], max_gen_toks: int,
                     desc: str = "generating") -> List[Completion]:
    """lm-eval's ``generate_until`` (greedy): the EOS text is added to ``until`` as lm-eval does."""
    stops = list(until) + [e for e in eos_text(runner) if e not in until]
    return runner.generate([lm_eval_context_ids(runner, c) for c in contexts], max_gen_toks, stop=stops,
                           desc=desc)


def eos_text(runner: ModelRunner) -> List[str]:
    """The EOS token's text, which lm-eval adds to every ``until``."""
    eos = runner.eos_id
    return [] if eos is None else [runner.tokenizer.decode([eos], skip_special_tokens=False)]


def lm_eval_context_ids(runner: ModelRunner, context: str) -> List[int]:
    """``tok_batch_encode``'s tokens of one context: the tokenizer's own call (its special tokens), without them when
    the context starts with the BOS text."""
    tok = runner.tokenizer
    bos = getattr(tok, "bos_token", None)
    if bos and context.startswith(bos):
        return tok(context, add_special_tokens=False)["input_ids"]
    return tok(context)["input_ids"]


def modellink_prompt_ids(tokenizer, prompt: str, no_chat_template: bool = False, prompt_type: Optional[str] = None,
                         rendered: bool = False) -> List[int]:
    """The tokens ModelLink's ``LLMChat.chat`` generates from: with ``--prompt-type`` the prompt as one user turn of
    that chat template (``rendered``: the prompt is already a rendered conversation); else the tokenizer's own chat
    template when it has one and ``--no-chat-template`` is not given; else the prompt itself."""
    if rendered:
        return tokenizer.encode(prompt)
    if prompt_type:
        from aquila_npu.inference.chat import conversation_prompt

        try:
            return tokenizer.encode(conversation_prompt(prompt_type, prompt))
        except ValueError as e:
            raise UsageError(f"--prompt-type {prompt_type}: {e}") from None
    if getattr(tokenizer, "chat_template", None) and not no_chat_template:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}]))
    return tokenizer.encode(prompt)


def modellink_generate(runner: ModelRunner, prompts: Sequence[str], max_new_tokens: int, options,
                       rendered: bool = False, sampling: SamplingParams = SamplingParams(),
                       desc: str = "generating") -> List[Completion]:
    """ModelLink's greedy generation of ``max_new_tokens`` for each prompt (``options``: the task's EvalOptions)."""
    ids = [modellink_prompt_ids(runner.tokenizer, p, options.no_chat_template, options.prompt_type, rendered)
           for p in prompts]
    return runner.generate(ids, max_new_tokens, sampling=sampling, desc=desc)


# ---------------------------------------------------------------- lm-eval filters and metrics
def regex_filter(text: str, pattern: str, group_select: int = 0, fallback: str = INVALID) -> str:
    """lm-eval's ``RegexFilter`` on one response."""
    matches = re.findall(pattern, text)
    if not matches:
        return fallback
    match = matches[group_select]
    if isinstance(match, tuple):
        match = [m for m in match if m]
        match = match[0] if match else fallback
    return match.strip()


def exact_match(prediction: str, reference: str, regexes_to_ignore: Sequence[str] = (), ignore_case: bool = False,
                ignore_punctuation: bool = False) -> float:
    """lm-eval's ``exact_match`` (``exact_match_hf_evaluate``) of one prediction."""
    for r in regexes_to_ignore:
        prediction, reference = re.sub(r, "", prediction), re.sub(r, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        prediction, reference = prediction.translate(table), reference.translate(table)
    return float(prediction == reference)


class GenerationTask(Task):
    """A task answered by generation under both scorings: each document has a ``prompt`` (built by ``load`` for the
    task's scoring) and a ``target``; ``judge`` reads the answer from the generated text."""

    lm_eval_until: Tuple[str, ...] = ()
    lm_eval_max_gen_toks = 256  # lm-eval's default max_gen_toks
    modellink_max_new_tokens = 128  # ModelLink's default --max-new-tokens

    def judge(self, doc: dict, text: str, scoring: str) -> Tuple[object, Dict[str, float], bool]:
        """(prediction, metrics, correct) of one generated text."""
        raise NotImplementedError

    def score(self, docs: Sequence[dict], runner, scoring: Optional[str] = None) -> List[dict]:
        scoring = self.checked_scoring(scoring)
        from aquila_npu.evaluation.runner import ModelRunner  # torch and megatron-core: only once a model runs

        runner = ModelRunner.of(runner)
        prompts = [d["prompt"] for d in docs]
        if scoring == "lm-eval":
            outs = lm_eval_generate(runner, prompts, self.lm_eval_until,
                                    self.options.max_new_tokens or self.lm_eval_max_gen_toks, desc=self.name)
        else:
            outs = modellink_generate(runner, prompts, self.options.max_new_tokens or self.modellink_max_new_tokens,
                                      self.options, desc=self.name)
        records = []
        for d, out in zip(docs, outs):
            prediction, metrics, correct = self.judge(d, out.text, scoring)
            records.append({"file": d["file"], "line": d["line"], "subject": d["subject"], "prompt": d["prompt"],
                            "target": d["target"], "generation": out.text, "prediction": prediction,
                            "correct": bool(correct), "metrics": metrics, "truncated": out.truncated})
        return records
