"""Four-choice exam benchmarks (MMLU, C-Eval, CMMLU): one CSV file per subject, questions with options A-D and a
letter answer; the few-shot examples come from the subject's file in the sibling ``dev`` folder.

``--task-data-path`` is the folder of the evaluated split (MMLU ``test``, C-Eval ``val``, CMMLU ``test``) or one
file of it; ``{that folder}/../dev/`` holds the dev files. The subject is the file name without ``_test`` /
``_val`` / ``_dev`` and the extension (ModelLink's rule).

* ``lm-eval``: lm-eval's ``mmlu`` / ``ceval-valid`` / ``cmmlu``: the subject's description, ``--num-fewshot``
  (default 0, lm-eval's default) first dev rows as "{query} {letter}\\n\\n", then the query; scored by the
  log-likelihood of " A" .. " D" (one forward pass per question); ``acc`` and ``acc_norm``.
* ``modellink``: ModelLink's 5-shot prompt (its fixed few-shot block is the subject's five dev rows written in its
  format, see each task's module), greedy generation of ``--max-new-tokens`` (default 2) tokens, the answer taken
  from the text by ModelLink's rule for the benchmark; ``acc``.
* ``modellink`` with ``--prompt-type NAME``: ModelLink's chat variant: five dev rows drawn with ``--seed`` (pandas'
  ``DataFrame.sample``, as ModelLink draws them) become user/assistant turns of the chat template NAME (system text
  in ``--eval-language``), the answer is the first capital letter of the reply.
"""

from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from aquila_npu.errors import DataError, UsageError
from aquila_npu.evaluation import data
from aquila_npu.evaluation.protocols import (choice_loglikelihoods, modellink_generate, multiple_choice_metrics,
                                             argmax)
from aquila_npu.evaluation.tasks import Task

LETTERS = ("A", "B", "C", "D")
SUBJECT_SUFFIX = re.compile(r"(?:_test|_val|_dev)?\.\w+$")  # ModelLink's subject_name rule

# ModelLink's chat few-shot system texts (template.py's "en" / "zh" EvalTemplate), by --eval-language.
CHAT_SYSTEM = {"en": "The following are multiple choice questions (with answers) about {subject}.\n\n",
               "zh": "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"}
CHAT_ANSWER = {"en": "\nAnswer: ", "zh": "\n答案："}


def subject_of(file: str) -> str:
    return SUBJECT_SUFFIX.sub("", os.path.basename(file))


def first_capital(text: str) -> str:
    """ModelLink's ``first_capital_postprocess``."""
    for ch in text.strip():
        if ch.isupper():
            return ch
    return ""


class ExamTask(Task):
    """A four-choice exam. Subclasses set the file layout and the prompts of both scorings."""

    header: bool = True  # the CSV files have a header line
    columns: Tuple[str, ...] = ("question", "A", "B", "C", "D", "answer")  # question, 4 options, answer
    dev_name: str = "{subject}_dev.csv"
    modellink_max_new_tokens = 2  # MindSpeed-LLM's recommended --max-new-tokens for this benchmark
    lm_eval_answer_cue: str = "Answer:"  # the end of lm-eval's doc_to_text
    known_subjects: Optional[Dict] = None  # the benchmark's subjects, when its prompts need a subject's table entry

    # ---------------------------------------------------------------- per benchmark
    def lm_eval_description(self, subject: str) -> str:
        raise NotImplementedError

    def modellink_fewshot(self, subject: str, dev: Sequence[dict]) -> str:
        raise NotImplementedError

    def modellink_prompt(self, fewshot: str, row: dict) -> str:
        raise NotImplementedError

    def modellink_answer(self, generation: str, chat: bool) -> Optional[str]:
        """The answer ModelLink reads from the generated text (``chat``: the ``--prompt-type`` variant)."""
        raise NotImplementedError

    def modellink_correct(self, prediction: Optional[str], answer: str) -> bool:
        return prediction is not None and prediction == answer

    def chat_subject(self, subject: str) -> str:
        return subject

    # ---------------------------------------------------------------- loading
    def _modellink(self) -> bool:
        return self.scoring == "modellink"

    def _read(self, file: str, pandas_defaults: bool) -> List[dict]:
        """The rows of one subject file; ``pandas_defaults``: read as ModelLink's ``pd.read_csv`` reads it."""
        q, *opts, ans = self.columns
        rows = []
        for r in data.read_csv(file, self.columns, header=self.header, modellink=pandas_defaults, required=(q, ans)):
            answer = data.text(r.data[ans])
            if answer.strip() not in LETTERS:
                raise DataError(f"{r.where}: '{ans}' is {answer!r}, expected one of A, B, C, D")
            rows.append({"file": file, "line": r.line, "question": data.text(r.data[q]),
                         "choices": [data.text(r.data[o]) for o in opts], "answer": answer})
        return rows

    def _dev_rows(self, path: str, subject: str, needed: int, why: str, pandas_defaults: bool = False) -> List[dict]:
        """The subject's dev rows: their text as in the file (ModelLink's fixed few-shot blocks are the dev rows'
        text), or as pandas reads them (ModelLink's chat variant reads them with pandas)."""
        found, looked = data.find_sibling(path, "dev", self.dev_name.format(subject=subject))
        if found is None:
            raise DataError(f"{looked}: no such file ({why} needs the subject's dev split next to the "
                            f"--task-data-path folder)")
        rows = self._read(found, pandas_defaults)
        if len(rows) < needed:
            raise DataError(f"{found}: {len(rows)} rows, {why} needs {needed}")
        return rows

    def load(self, path: Optional[str], limit: Optional[int] = None) -> List[dict]:
        if path is None:
            raise UsageError(f"--task-data-path: {self.name} needs its data folder")
        k = self._num_fewshot()
        docs: List[dict] = []
        for file in data.list_files(path, (".csv",)):
            subject = subject_of(file)
            if self.known_subjects is not None and subject not in self.known_subjects:
                raise DataError(f"{file}: {self.name} subject {subject!r} (from the file name) is not one of its "
                                f"{len(self.known_subjects)} subjects ({', '.join(sorted(self.known_subjects))})")
            rows = self._read(file, pandas_defaults=self._modellink())[:self.options.max_eval_samples]  # per file
            if self._modellink() and self.options.prompt_type:
                shared = {"support": self._chat_support(self._dev_rows(path, subject, 1, "--prompt-type", True))}
            elif self._modellink():
                shared = {"fewshot": self.modellink_fewshot(subject, self._dev_rows(path, subject, 1, "the modellink "
                                                                                     "scoring"))}
            else:
                dev = self._dev_rows(path, subject, k, f"--num-fewshot {k}") if k else []
                shared = {"fewshot": self.lm_eval_description(subject)
                          + "".join(f"{self._lm_eval_query(r)} {r['answer'].strip()}\n\n" for r in dev[:k])}
            for r in rows:
                docs.append({**r, "subject": subject, **shared})
                if limit is not None and len(docs) >= limit:
                    return docs
        return docs

    def _num_fewshot(self) -> int:
        k = self.options.num_fewshot
        if k is not None and k < 0:
            raise UsageError(f"--num-fewshot {k} must be >= 0")
        return 0 if k is None else k

    # ---------------------------------------------------------------- prompts
    def _lm_eval_query(self, r: dict) -> str:
        a, b, c, d = r["choices"]
        return f"{r['question'].strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\n{self.lm_eval_answer_cue}"

    @staticmethod
    def question_block(r: dict) -> str:
        """ModelLink's ``test_question``."""
        a, b, c, d = r["choices"]
        return f"{r['question']}\nA. {a}\nB. {b}\nC. {c}\nD. {d}"

    def _chat_support(self, dev: List[dict]) -> List[dict]:
        """ModelLink's ``train_data_df.sample(min(5, len), random_state=seed)``."""
        import pandas as pd

        frame = pd.DataFrame({"i": range(len(dev))})
        picked = frame.sample(min(5, len(dev)), random_state=self.options.seed)["i"].tolist()
        return [dev[i] for i in picked]

    def _chat_prompt(self, doc: dict) -> str:
        from aquila_npu.inference.chat import conversation_prompt

        name, lang = self.options.prompt_type, self.options.eval_language  # checked by tasks.check_options

        def user(r):
            return r["question"] + "".join(f"\n{x}. {c}" for x, c in zip(LETTERS, r["choices"])) + CHAT_ANSWER[lang]

        turns = [(user(r), r["answer"]) for r in doc["support"]] + [(user(doc), "")]
        system = CHAT_SYSTEM[lang].format(subject=self.chat_subject(doc["subject"]))
        turns[0] = (system + turns[0][0], turns[0][1])
        # conversation.py's get_prompt() of the few-shot turns and the question
        return conversation_prompt(name, turns[-1][0], history=turns[:-1])

    def prompt(self, doc: dict) -> str:
        if not self._modellink():
            return doc["fewshot"] + self._lm_eval_query(doc)
        if self.options.prompt_type:
            return self._chat_prompt(doc)
        return self.modellink_prompt(doc["fewshot"], doc)

    # ---------------------------------------------------------------- scoring
    def score(self, docs: Sequence[dict], runner, scoring: Optional[str] = None) -> List[dict]:
        scoring = self.checked_scoring(scoring)
        from aquila_npu.evaluation.runner import ModelRunner  # torch and megatron-core: only once a model runs

        runner = ModelRunner.of(runner)
        prompts = [self.prompt(d) for d in docs]
        records = []
        if scoring == "lm-eval":
            lls = choice_loglikelihoods(runner, prompts, [LETTERS] * len(docs))
            for d, p, ll in zip(docs, prompts, lls):
                gold = LETTERS.index(d["answer"].strip())
                m = multiple_choice_metrics(ll, LETTERS, [gold])
                records.append(self._record(d, p, LETTERS[argmax(ll)], m, loglikelihoods=ll))
        else:
            n = self.options.max_new_tokens or self.modellink_max_new_tokens
            outs = modellink_generate(runner, prompts, n, self.options, rendered=bool(self.options.prompt_type),
                                      desc=self.name)
            for d, p, out in zip(docs, prompts, outs):
                pred = self.modellink_answer(out.text, chat=bool(self.options.prompt_type))
                ok = self.modellink_correct(pred, d["answer"])
                records.append(self._record(d, p, pred, {"acc": float(ok)}, generation=out.text,
                                            truncated=out.truncated))
        return records

    def _record(self, d: dict, prompt: str, prediction, metrics: Dict[str, float], **extra) -> dict:
        return {"file": d["file"], "line": d["line"], "subject": d["subject"], "prompt": prompt,
                "target": d["answer"], "prediction": prediction, "correct": bool(metrics["acc"]),
                "metrics": metrics, **extra}

    def metric_names(self, scoring: str) -> Tuple[str, ...]:
        return ("acc", "acc_norm") if scoring == "lm-eval" else ("acc",)
