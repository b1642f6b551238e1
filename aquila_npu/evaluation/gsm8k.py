"""GSM8K (Cobbe et al. 2021): grade-school math word problems, the original JSON lines (``question``, ``answer``
ending "#### N"). ``--task-data-path``: ``test.jsonl`` or its folder (files named ``train*`` are never evaluated);
lm-eval's few-shot examples come from ``train.jsonl`` in that folder or its parent.

* ``lm-eval`` (``gsm8k``): ``--num-fewshot`` (default 5) train rows drawn by lm-eval's sampler (one
  ``random.Random(seed)``, default 1234, drawing ``sample(train, 5)`` for each test row in order: a row's shots do
  not depend on how rows are split across processes), each "Question: {q}\\nAnswer: {a}\\n\\n", then
  "Question: {q}\\nAnswer:"; greedy generation until "Question:", "</s>", "<|im_end|>" or the EOS, at most
  ``--max-new-tokens`` (default 256, lm-eval's ``max_gen_toks``); two filters, ``strict-match`` ("#### (number)")
  and ``flexible-extract`` (the last number), each scored by ``exact_match`` (case-insensitive, ignoring ",", "$",
  everything up to "#### " and a final ".").
* ``modellink`` (``gsm8k_eval.py``): "{3-shot}\\n\\n{question}" with ModelLink's fixed 3-shot block (Wei et al.'s
  exemplars, "Q: ..\\n\\nA:... The answer is N."), greedy generation of ``--max-new-tokens`` (default 512) tokens; the
  text before the first "Q:", "$" and "," removed and "." made spaces, the first "The answer is (.*?) " is the answer,
  compared with the text after "#### ". (ModelLink compares a one-element list with the answer string, so its
  accuracy is always 0; the comparison here is of the strings, as intended.)
"""

from __future__ import annotations

import json
import os
import random
import re
from typing import List, Optional, Tuple

from aquila_npu.errors import DataError, UsageError
from aquila_npu.evaluation import data
from aquila_npu.evaluation.protocols import GenerationTask, exact_match, regex_filter

PROMPTS = os.path.join(os.path.dirname(__file__), "prompts")
LM_EVAL_UNTIL = ("Question:", "</s>", "<|im_end|>")
LM_EVAL_MAX_GEN_TOKS = 256
LM_EVAL_NUM_FEWSHOT = 5
# lm-eval's filter_list: name -> (regex_pattern, group_select)
FILTERS = {"strict-match": (r"#### (\-?[0-9\.\,]+)", 0), "flexible-extract": (r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1)}
EXACT_MATCH_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")
MODELLINK_MAX_NEW_TOKENS = 512
MODELLINK_ANSWER = r"The answer is (.*?) "


def modellink_fewshot() -> str:
    with open(os.path.join(PROMPTS, "modellink_gsm8k_3shot.json"), encoding="utf-8") as f:
        return json.load(f)["few_shot"]


def modellink_gsm8k_answer(text: str) -> Optional[str]:
    """ModelLink's extraction: the first "The answer is X " of the text before "Q:", after removing "$" and "," and
    turning "." into spaces."""
    answer = text.lstrip().split("Q:")[0]
    cleaned = (answer.replace("$", "").replace(",", "") + "  ").replace(".", " ")
    found = re.findall(MODELLINK_ANSWER, cleaned)
    if not found:
        return None
    return found[0][::-1].replace(".", "", 1)[::-1]


def _rows(path: str, exclude_train: bool) -> List[data.Row]:
    rows = list(data.read_jsonl(path, suffixes=(".jsonl",), exclude_prefixes=("train",) if exclude_train else ()))
    if not rows:
        raise DataError(f"{path}: no rows")
    for r in rows:
        for field in ("question", "answer"):
            if not isinstance(r.data.get(field), str) or not r.data[field].strip():
                raise DataError(f"{r.where}: '{field}' is missing or not a non-empty string")
    return rows


def find_train(path: str) -> Tuple[Optional[str], List[str]]:
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    looked = [os.path.join(folder, "train.jsonl"), os.path.join(os.path.dirname(os.path.normpath(folder)),
                                                                  "train.jsonl")]
    return next((p for p in looked if os.path.isfile(p)), None), looked


class GSM8K(GenerationTask):
    name = "gsm8k"
    description = "GSM8K grade-school math, generation (exact match)"
    lm_eval_until = LM_EVAL_UNTIL
    lm_eval_max_gen_toks = LM_EVAL_MAX_GEN_TOKS
    modellink_max_new_tokens = MODELLINK_MAX_NEW_TOKENS

    def load(self, path: Optional[str], limit: Optional[int] = None) -> List[dict]:
        if path is None:
            raise UsageError("--task-data-path: gsm8k needs its test.jsonl (or folder)")
        rows = _rows(path, exclude_train=True)
        rows = data.first_per_file(rows, self.options.max_eval_samples)[:limit]
        docs = [{"file": r.file, "line": r.line, "subject": "gsm8k", "question": r.data["question"],
                 "target": r.data["answer"]} for r in rows]
        if self.scoring == "modellink":
            fewshot = modellink_fewshot()
            for d in docs:
                d["prompt"] = f"{fewshot}\n\n{d['question']}"
            return docs
        k = LM_EVAL_NUM_FEWSHOT if self.options.num_fewshot is None else self.options.num_fewshot
        if k < 0:
            raise UsageError(f"--num-fewshot {k} must be >= 0")
        train: List[data.Row] = []
        if k:
            found, looked = find_train(path)
            if found is None:
                raise DataError(f"{' or '.join(looked)}: no such file (lm-eval's gsm8k draws its {k} examples from "
                                "the train split)")
            train = _rows(found, exclude_train=False)
            if len(train) < k:
                raise DataError(f"{found}: {len(train)} rows, --num-fewshot {k} needs {k}")
        rnd = random.Random(self.options.seed)  # lm-eval's ContextSampler, seeded once per task
        pool = [(t.data["question"], t.data["answer"]) for t in train]
        for d in docs:
            shots = rnd.sample(pool, k) if k else []
            d["prompt"] = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in shots) + \
                f"Question: {d['question']}\nAnswer:"
        return docs

    def judge(self, doc: dict, text: str, scoring: str):
        if scoring == "lm-eval":
            filtered = {name: regex_filter(text, pattern, group) for name, (pattern, group) in FILTERS.items()}
            metrics = {f"exact_match,{name}": exact_match(v, doc["target"], EXACT_MATCH_IGNORE, ignore_case=True)
                       for name, v in filtered.items()}
            return filtered, metrics, metrics["exact_match,strict-match"]
        pred = modellink_gsm8k_answer(text)
        ok = pred == doc["target"].split("#### ")[-1]
        return pred, {"acc": float(ok)}, ok

    def metric_names(self, scoring: str) -> Tuple[str, ...]:
        if scoring == "lm-eval":
            return tuple(f"exact_match,{name}" for name in FILTERS)
        return ("acc",)
