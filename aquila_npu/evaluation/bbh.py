"""BIG-Bench Hard (Suzgun et al. 2022): 27 subtasks, BIG-Bench-Hard's ``bbh/{subtask}.json`` files (``{"examples":
[{"input", "target"}, ...]}``). ``--task-data-path``: that folder or one file; the subtask is the file name.

* ``lm-eval`` (``bbh_fewshot``): the subtask's description and three answer-only examples (lm-eval's inline
  ``fewshot_config.samples``, shipped in ``prompts/lm_eval_bbh_fewshot.json``) as "Q: {input}\\nA: {target}\\n\\n",
  then "Q: {input}\\nA:"; greedy generation until "</s>", "Q", "\\n\\n" or the EOS, at most ``--max-new-tokens``
  (default 256); ``exact_match`` of the text with the target (case-sensitive, nothing ignored).
* ``modellink`` (``bbh_eval.py``): "{3-shot}Q: {input}\\nA:" with ModelLink's answer-only block for the subtask
  (``prompts/modellink_bbh_3shot.json``), greedy generation of ``--max-new-tokens`` (default 32) tokens; the answer is
  the first line's text after its last "(", up to the first ".", ")" or line break, stripped of parentheses (for the
  true/false subtasks the first yes/no/true/false/valid/invalid word in it), compared case-insensitively with the
  target without its parentheses.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from typing import List, Optional, Tuple

from aquila_npu.errors import DataError, UsageError
from aquila_npu.evaluation import data
from aquila_npu.evaluation.exams import subject_of
from aquila_npu.evaluation.protocols import GenerationTask, exact_match

PROMPTS = os.path.join(os.path.dirname(__file__), "prompts")
LM_EVAL_UNTIL = ("</s>", "Q", "\n\n")
LM_EVAL_MAX_GEN_TOKS = 256
MODELLINK_MAX_NEW_TOKENS = 32
# ModelLink's bbh_true_or_false_questions: the answer is the first of these words in the extracted text.
TRUE_OR_FALSE = ("navigate", "sports_understanding", "boolean_expressions", "formal_fallacies", "causal_judgement",
                 "web_of_lies")


@lru_cache(maxsize=None)
def _prompts(name: str) -> dict:
    with open(os.path.join(PROMPTS, name), encoding="utf-8") as f:
        return json.load(f)


def modellink_bbh_answer(text: str, subtask: str) -> str:
    """ModelLink's ``extract_answer`` (no chat template) then its first line; "" when nothing is left."""
    response = text.lstrip()
    if response:
        first = response.splitlines()[0]
        response = re.split(r"\.|\n\n|\n|\)", re.sub(r".*\(", "", first))[0].strip("()")
    if subtask in TRUE_OR_FALSE:
        m = re.search(r"\b(yes|no|true|false|invalid|valid)\b", response, re.IGNORECASE)
        response = m.group() if m else response
    lines = response.splitlines()
    return lines[0] if lines else ""


class BBH(GenerationTask):
    name = "bbh"
    description = "BIG-Bench Hard, 27 subtasks, 3-shot generation (exact match)"
    lm_eval_until = LM_EVAL_UNTIL
    lm_eval_max_gen_toks = LM_EVAL_MAX_GEN_TOKS
    modellink_max_new_tokens = MODELLINK_MAX_NEW_TOKENS

    def load(self, path: Optional[str], limit: Optional[int] = None) -> List[dict]:
        if path is None:
            raise UsageError("--task-data-path: bbh needs its folder of subtask .json files")
        modellink = self.scoring == "modellink"
        if self.options.prompt_type:
            raise UsageError("--prompt-type: not available for bbh (ModelLink's chat variant of BBH re-scores "
                             "answers by loss; use the default prompts)")
        shots = _prompts("modellink_bbh_3shot.json" if modellink else "lm_eval_bbh_fewshot.json")
        k = 3 if self.options.num_fewshot is None else self.options.num_fewshot
        if not modellink and not 0 <= k <= 3:
            raise UsageError(f"--num-fewshot {k}: lm-eval's bbh_fewshot has 3 examples per subtask")
        docs: List[dict] = []
        for file in data.list_files(path, (".json",)):
            subtask = subject_of(file)
            if subtask not in shots:
                raise DataError(f"{file}: {subtask!r} is not a BIG-Bench Hard subtask ({', '.join(sorted(shots))})")
            content = data.read_json(file)
            examples = content.get("examples") if isinstance(content, dict) else None
            if not isinstance(examples, list) or not examples:
                raise DataError(f"{file}: expected {{\"examples\": [...]}} with at least one example")
            if modellink:
                fewshot = shots[subtask]
            else:
                s = shots[subtask]
                fewshot = s["description"] + "".join(f"Q: {e['input']}\nA: {e['target']}\n\n"
                                                     for e in s["samples"][:k])
            for i, e in enumerate(examples[:self.options.max_eval_samples], 1):
                if not isinstance(e, dict) or not all(isinstance(e.get(f), str) for f in ("input", "target")):
                    raise DataError(f"{file} example {i}: expected string 'input' and 'target'")
                docs.append({"file": file, "line": i, "subject": subtask, "input": e["input"], "target": e["target"],
                             "prompt": f"{fewshot}Q: {e['input']}\nA:"})
                if limit is not None and len(docs) >= limit:
                    return docs
        return docs

    def judge(self, doc: dict, text: str, scoring: str):
        if scoring == "lm-eval":
            m = exact_match(text, doc["target"])
            return text, {"exact_match": m}, m
        pred = modellink_bbh_answer(text, doc["subject"])
        ok = bool(pred) and pred.lower() == doc["target"].lstrip("(").rstrip(")").lower()
        return pred, {"acc": float(ok)}, ok

    def metric_names(self, scoring: str) -> Tuple[str, ...]:
        return ("exact_match",) if scoring == "lm-eval" else ("acc",)
