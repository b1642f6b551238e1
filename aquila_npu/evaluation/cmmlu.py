"""CMMLU (Li et al. 2023): 67 subjects, the repository's CSV files (an unnamed index column, then Question, A, B,
C, D, Answer): ``test/{subject}.csv``, few-shot from ``dev/{subject}.csv``.

* ``lm-eval`` (``cmmlu``): description "以下是关于{学科}的单项选择题，请直接给出正确答案的选项。\\n\\n", query
  "{Question.strip()}\\nA. ..\\nD. ..\\n答案：", continuations " A" .. " D"; ``acc`` and ``acc_norm``.
* ``modellink`` (``cmmlu_eval.py``): "{few-shot}\\n\\n{question}\\nA. ..\\nD. ..\\n答案： "; the few-shot block of
  ``cmmlu_5shot_template.json`` is "以下是中国关于{学科}考试的单项选择题，请选出其中的正确答案。\\n " (a space
  after the newline) and the five dev rows "{question}\\nA. ..\\nD. ..\\n答案： {answer}\\n", rebuilt here from the
  dev file (identical to the template for all 67 subjects of CMMLU's own dev split). The answer is the first option
  found by ModelLink's ``first_option_postprocess`` patterns (``configs/evaluate/cmmlu_answer_finding_patterns.json``,
  then "([ABCD]):" and "[ABCD]").
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from typing import Optional, Sequence, Tuple

from aquila_npu.evaluation.exams import ExamTask
from aquila_npu.evaluation import subjects

PATTERNS_FILE = os.path.join(os.path.dirname(__file__), "prompts", "modellink_cmmlu_answer_patterns.json")


@lru_cache(maxsize=None)
def _answer_patterns(options: str) -> Tuple[str, ...]:
    with open(PATTERNS_FILE, encoding="utf-8") as f:
        patterns = json.load(f)["patterns"]
    return (*patterns, f"([{options}]):", f"[{options}]")


def first_option(text: str, options: str = "ABCD") -> str:
    """ModelLink's ``first_option_postprocess`` (CMMLU): the last character of the first pattern's match, if it is
    an option; "" if no pattern gives one."""
    text = text.strip()
    for pattern in _answer_patterns(options):
        m = re.search(pattern, text, re.DOTALL)
        if m:
            last = m.group(0)[-1]
            for option in options:
                if option in last:
                    return option
    return ""


class CMMLU(ExamTask):
    name = "cmmlu"
    description = "CMMLU, 67 Chinese subjects of four-choice questions (accuracy)"
    columns = ("Question", "A", "B", "C", "D", "Answer")
    dev_name = "{subject}.csv"
    lm_eval_answer_cue = "答案："

    known_subjects = subjects.CMMLU

    def _zh(self, subject: str) -> str:
        return subjects.CMMLU[subject][0]

    def lm_eval_description(self, subject: str) -> str:
        return f"以下是关于{self._zh(subject)}的单项选择题，请直接给出正确答案的选项。\n\n"

    def modellink_fewshot(self, subject: str, dev: Sequence[dict]) -> str:
        shots = "".join(f"{self.question_block(r)}\n答案： {r['answer']}\n" for r in dev[:5])
        return f"以下是中国关于{self._zh(subject)}考试的单项选择题，请选出其中的正确答案。\n {shots}"

    def modellink_prompt(self, fewshot: str, row: dict) -> str:
        return f"{fewshot}\n\n{self.question_block(row)}\n答案： "

    def modellink_answer(self, generation: str, chat: bool) -> Optional[str]:
        return first_option(generation.lstrip())

    def chat_subject(self, subject: str) -> str:
        return self._zh(subject) if "zh" in self.options.eval_language else subject

    def categories(self, subject: str) -> Tuple[str, ...]:
        return subjects.cmmlu_categories(subject)
