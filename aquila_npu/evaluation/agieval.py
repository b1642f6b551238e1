"""AGIEval (Zhong et al. 2023): 21 subsets, AGIEval's ``data/v1/{subset}.jsonl`` rows (``passage``, ``question``,
``options``, ``label``, ``answer``). ``--task-data-path``: that folder or one file; the subset is the file name.

* ``lm-eval`` (``agieval_*``, zero-shot): the query of lm-eval's ``hails/agieval-*`` copies, which is AGIEval's own
  zero-shot prompt (``dataset_loader.convert_zero_shot``): English multiple choice "{passage}Q: {question} Answer
  Choices: {options joined by " "}\\nA: Among A through {last letter}, the answer is", Chinese "{passage}问题：
  {question} 选项：{options}\\n答案：从A到{last letter}, 我们应选择", cloze "{passage}Q: {question}\\nA: The answer
  is" / "{passage}问题：{question}\\n答案：". Multiple-choice subsets are scored by the log-likelihood of " " + each
  option (``acc`` = argmax among the gold options, ``acc_norm`` by option length); ``math`` and
  ``gaokao-mathcloze`` generate (until "Q:", 32 tokens) and compare with AGIEval's math equivalence (lm-eval's
  ``agieval/utils.py``, which this scoring imports: it needs lm-eval installed). Rows already in the hails layout
  (``query``, ``choices``, ``gold``) are taken as they are.
* ``modellink`` (``agi_eval.py``): "{few-shot}   {question}\\n{question template}\\n{options}\\n{answer template}"
  with ModelLink's per-subset few-shot material (``prompts/modellink_agieval_fewshot.json``), the question being
  "{passage}\\n{question}" when there is a passage and the options joined by "\\n"; greedy generation of
  ``--max-new-tokens`` (default 3) tokens; the answer is the first line of the lstripped text without "$", "(" and
  ")", compared with the label (labels of multi-answer rows joined by ",") or, for cloze rows, the answer without "$".
"""

from __future__ import annotations

import importlib.util
import json
import os
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

from aquila_npu.errors import DataError, MissingDependency, UsageError
from aquila_npu.evaluation import data
from aquila_npu.evaluation.exams import subject_of
from aquila_npu.evaluation.protocols import (argmax, choice_loglikelihoods, lm_eval_generate, modellink_generate,
                                             multiple_choice_metrics)
from aquila_npu.evaluation.tasks import Task

PROMPTS = os.path.join(os.path.dirname(__file__), "prompts")
# AGIEval's dataset_loader lists.
ENGLISH_QA = ("lsat-ar", "lsat-lr", "lsat-rc", "logiqa-en", "sat-math", "sat-en", "aqua-rat", "sat-en-without-passage",
              "gaokao-english")
CHINESE_QA = ("logiqa-zh", "jec-qa-kd", "jec-qa-ca", "gaokao-chinese", "gaokao-geography", "gaokao-history",
              "gaokao-biology", "gaokao-chemistry", "gaokao-physics", "gaokao-mathqa")
CLOZE = {"math": "Q: {question}\nA: The answer is", "gaokao-mathcloze": "问题：{question}\n答案："}
LM_EVAL_CLOZE_UNTIL = ("Q:",)
LM_EVAL_CLOZE_MAX_GEN_TOKS = 32
MODELLINK_MAX_NEW_TOKENS = 3
LETTERS = "ABCDEFG"


@lru_cache(maxsize=None)
def modellink_fewshot() -> dict:
    with open(os.path.join(PROMPTS, "modellink_agieval_fewshot.json"), encoding="utf-8") as f:
        return json.load(f)


def zero_shot_query(row: dict, subset: str) -> str:
    """AGIEval's ``convert_zero_shot`` (the ``query`` of lm-eval's hails/agieval-* data)."""
    passage = row.get("passage") or ""
    options = row.get("options") or []
    if subset in ENGLISH_QA:
        count = len(options) if len(options) != 1 else 5
        return (f"{passage}Q: {row['question']} Answer Choices: {' '.join(options)}\n"
                f"A: Among A through {LETTERS[count - 1]}, the answer is")
    if subset in CHINESE_QA:
        count = len(options) if len(options) != 1 else 4
        return f"{passage}问题：{row['question']} 选项：{' '.join(options)}\n答案：从A到{LETTERS[count - 1]}, 我们应选择"
    return passage + CLOZE[subset].format(question=row["question"])


def modellink_fields(row: dict) -> Tuple[str, str, Optional[str]]:
    """ModelLink's ``get_default_instruction``: (question, options, correct answer)."""
    question = row["passage"] + "\n" + row["question"] if row.get("passage") else row["question"]
    options = "\n".join(row["options"]) if row.get("options") else ""
    label = row.get("label")
    if label:
        correct = ",".join(label) if isinstance(label, list) else label
    else:
        correct = row["answer"].replace("$", "") if row.get("answer") else None
    return question, options, correct


@lru_cache(maxsize=None)
def _lm_eval_agieval_utils():
    """lm-eval's ``tasks/agieval/utils.py`` (AGIEval's math answer parsing and equivalence), loaded from its file:
    the lm-eval scoring of ``math`` / ``gaokao-mathcloze`` is that function's verdict, not a rewrite of it."""
    spec = importlib.util.find_spec("lm_eval")
    path = os.path.join(os.path.dirname(spec.origin), "tasks", "agieval", "utils.py") if spec and spec.origin else None
    if path is None or not os.path.isfile(path):
        raise MissingDependency("--scoring lm-eval for AGIEval's math and gaokao-mathcloze uses lm-eval's answer "
                                "equivalence: pip install lm-eval==0.4.13")
    module_spec = importlib.util.spec_from_file_location("_lm_eval_agieval_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


class AGIEval(Task):
    name = "agieval"
    description = "AGIEval, 21 exam subsets (accuracy)"

    def load(self, path: Optional[str], limit: Optional[int] = None) -> List[dict]:
        if path is None:
            raise UsageError("--task-data-path: agieval needs its folder of subset .jsonl files")
        modellink = self.scoring == "modellink"
        known = modellink_fewshot()
        if not modellink and self.options.num_fewshot:
            raise UsageError(f"--num-fewshot {self.options.num_fewshot}: lm-eval's agieval tasks are zero-shot")
        rows = data.first_per_file(list(data.read_jsonl(path, suffixes=(".jsonl",))), self.options.max_eval_samples)
        if not rows:
            raise DataError(f"{path}: no rows")
        docs = []
        for r in rows[:limit]:
            subset = subject_of(r.file)
            if subset not in known:
                raise DataError(f"{r.file}: {subset!r} is not an AGIEval subset ({', '.join(sorted(known))})")
            doc = {"file": r.file, "line": r.line, "subject": subset}
            doc.update(self._modellink_doc(r, subset) if modellink else self._lm_eval_doc(r, subset))
            docs.append(doc)
        if not modellink and any(d["subject"] in CLOZE for d in docs):
            _lm_eval_agieval_utils()  # a missing lm-eval is an error before the model loads
        return docs

    @staticmethod
    def _check(r: data.Row, fields: Sequence[str]) -> None:
        for f in fields:
            if f not in r.data:
                raise DataError(f"{r.where}: no '{f}' field")

    def _modellink_doc(self, r: data.Row, subset: str) -> dict:
        self._check(r, ("question",))
        question, options, correct = modellink_fields(r.data)
        fewshot, question_template, answer_template = modellink_fewshot()[subset]
        prompt = f"{fewshot}   {question}\n{question_template}\n{options}\n{answer_template}"
        return {"prompt": prompt, "target": correct}

    def _lm_eval_doc(self, r: data.Row, subset: str) -> dict:
        d = r.data
        if subset in CLOZE:
            if "query" not in d:
                self._check(r, ("question", "answer"))
            return {"prompt": d.get("query") or zero_shot_query(d, subset), "target": d["answer"]}
        if "query" in d:
            self._check(r, ("choices", "gold"))
            return {"prompt": d["query"], "choices": list(d["choices"]), "gold": list(d["gold"]),
                    "target": d["gold"]}
        self._check(r, ("question", "options", "label"))
        options, label = d["options"] or [], d["label"]
        labels = label if isinstance(label, list) else [label]
        if not options or any(not isinstance(x, str) or x not in LETTERS[:len(options)] for x in labels):
            raise DataError(f"{r.where}: label {label!r} does not name one of the {len(options)} options")
        return {"prompt": zero_shot_query(d, subset), "choices": list(options),
                "gold": [LETTERS.index(x) for x in labels], "target": label}

    def score(self, docs: Sequence[dict], runner, scoring: Optional[str] = None) -> List[dict]:
        scoring = self.checked_scoring(scoring)
        from aquila_npu.evaluation.runner import ModelRunner  # torch and megatron-core: only once a model runs

        runner = ModelRunner.of(runner)
        records: List[Optional[dict]] = [None] * len(docs)
        if scoring == "modellink":
            outs = modellink_generate(runner, [d["prompt"] for d in docs],
                                      self.options.max_new_tokens or MODELLINK_MAX_NEW_TOKENS, self.options,
                                      desc=self.name)
            for i, (d, out) in enumerate(zip(docs, outs)):
                text = out.text.lstrip()
                pred = text.splitlines()[0].replace("$", "").replace("(", "").replace(")", "") if text else None
                ok = pred is not None and pred == d["target"]
                records[i] = self._record(d, pred, {"acc": float(ok)}, generation=out.text, truncated=out.truncated)
            return records  # type: ignore[return-value]
        mc = [i for i, d in enumerate(docs) if "choices" in d]
        lls = choice_loglikelihoods(runner, [docs[i]["prompt"] for i in mc], [docs[i]["choices"] for i in mc])
        for i, ll in zip(mc, lls):
            d = docs[i]
            m = multiple_choice_metrics(ll, d["choices"], d["gold"])
            records[i] = self._record(d, argmax(ll), m, loglikelihoods=ll)
        cloze = [i for i, d in enumerate(docs) if "choices" not in d]
        if cloze:
            utils = _lm_eval_agieval_utils()
            outs = lm_eval_generate(runner, [docs[i]["prompt"] for i in cloze], LM_EVAL_CLOZE_UNTIL,
                                    self.options.max_new_tokens or LM_EVAL_CLOZE_MAX_GEN_TOKS, desc=self.name)
            for i, out in zip(cloze, outs):
                d = docs[i]
                acc = float(utils.process_results({"answer": d["target"]}, [out.text])["acc"])
                records[i] = self._record(d, out.text, {"acc": acc}, generation=out.text, truncated=out.truncated)
        return records  # type: ignore[return-value]

    @staticmethod
    def _record(d: dict, prediction, metrics: dict, **extra) -> dict:
        return {"file": d["file"], "line": d["line"], "subject": d["subject"], "prompt": d["prompt"],
                "target": d["target"], "prediction": prediction, "correct": bool(metrics["acc"]), "metrics": metrics,
                **extra}

    def metric_names(self, scoring: str) -> Tuple[str, ...]:
        return ("acc", "acc_norm") if scoring == "lm-eval" else ("acc",)
