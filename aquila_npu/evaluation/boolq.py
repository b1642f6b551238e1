"""BoolQ (Clark et al. 2019): yes/no questions about a Wikipedia passage; the metric is accuracy.

Rows: ``question``, ``passage``, ``answer`` (bool), ``title`` (optional) as in the original ``dev.jsonl``
(SuperGLUE's ``label`` 0/1 is accepted instead of ``answer``). Both scorings use the prompt
``{passage}\\nQuestion: {question}?\\nAnswer:``:

* ``loglikelihood``, also called ``lm-eval`` (lm-evaluation-harness's ``boolq``): the more likely continuation of
  " no" / " yes" (a tie gives "no", the first choice, as lm-eval's argmax does);
* ``first-token``, also called ``modellink`` (ModelLink's ``boolq_eval.py``, behind the published Aquila2 figures
  77.8% / 88.0%): the next-token log-probabilities of ``encode("Yes")[-1]`` and ``encode("No")[-1]``; Yes >= No means
  true.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

from aquila_npu.errors import DataError, UsageError
from aquila_npu.evaluation.data import first_per_file, read_jsonl
from aquila_npu.evaluation.tasks import Task

PROMPT = "{passage}\nQuestion: {question}?\nAnswer:"
CHOICES = ("no", "yes")  # lm-eval's doc_to_choice order


def _answer(row) -> bool:
    d = row.data
    if "answer" in d:
        value, field = d["answer"], "answer"
    elif "label" in d:
        value, field = d["label"], "label"
    else:
        raise DataError(f"{row.where}: no 'answer' field")
    if isinstance(value, bool):
        return value
    if field == "label" and value in (0, 1):
        return bool(value)
    raise DataError(f"{row.where}: '{field}' is {value!r}, expected true or false")


def parse_row(row) -> dict:
    d = row.data
    for field in ("question", "passage"):
        if not isinstance(d.get(field), str) or not d[field].strip():
            raise DataError(f"{row.where}: '{field}' is missing or not a non-empty string")
    title = d.get("title", "")
    if not isinstance(title, str):
        raise DataError(f"{row.where}: 'title' is not a string")
    return {"file": row.file, "line": row.line, "question": d["question"], "passage": d["passage"],
            "title": title, "answer": _answer(row)}


def prompt(doc: dict) -> str:
    return PROMPT.format(passage=doc["passage"], question=doc["question"])


class BoolQ(Task):
    name = "boolq"
    description = "BoolQ yes/no reading comprehension (accuracy)"
    scorings = ("loglikelihood", "first-token")
    aliases = {"lm-eval": "loglikelihood", "modellink": "first-token"}

    def load(self, path: Optional[str], limit: Optional[int] = None) -> List[dict]:
        if path is None:
            raise DataError("--task-data-path: boolq needs its dev.jsonl (or folder)")
        if self.options.prompt_type:
            raise UsageError("--prompt-type: not available for boolq (its prompt is scored as it is)")
        docs = [parse_row(row) for row in first_per_file(list(read_jsonl(path)), self.options.max_eval_samples)]
        if not docs:
            raise DataError(f"--task-data-path {path}: no rows")
        return docs[:limit]

    def score(self, docs: Sequence[dict], scorer, scoring: Optional[str] = None) -> List[dict]:
        scoring = self.scoring if scoring is None else self.aliases.get(scoring, scoring)
        from aquila_npu.evaluation.runner import ModelRunner  # torch and megatron-core: only once a model runs

        scorer = ModelRunner.of(scorer)
        prompts = [prompt(d) for d in docs]
        if scoring == "loglikelihood":
            lls = scorer.loglikelihood([(p, " " + c) for p in prompts for c in CHOICES])
            pairs = [(lls[2 * i][0], lls[2 * i + 1][0]) for i in range(len(docs))]
            preds = [yes > no for no, yes in pairs]
        elif scoring == "first-token":
            yes_id, no_id = scorer.encode("Yes")[-1], scorer.encode("No")[-1]
            pairs = [(no, yes) for yes, no in scorer.next_token_logprobs(prompts, [yes_id, no_id])]
            preds = [yes >= no for no, yes in pairs]
        else:
            raise ValueError(f"boolq: unknown scoring {scoring!r}; choose one of {', '.join(self.scorings)}")
        return [{"file": d["file"], "line": d["line"], "subject": "boolq", "prompt": p, "question": d["question"],
                 "answer": d["answer"], "target": d["answer"], "prediction": pred, "correct": pred == d["answer"],
                 "metrics": {"acc": float(pred == d["answer"])}, "logprob_no": no, "logprob_yes": yes}
                for d, p, pred, (no, yes) in zip(docs, prompts, preds, pairs)]
