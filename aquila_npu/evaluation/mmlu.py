"""MMLU (Hendrycks et al. 2021): 57 subjects, the original ``data.tar`` layout: ``test/{subject}_test.csv`` and
``dev/{subject}_dev.csv``, no header, columns question, A, B, C, D, answer.

* ``lm-eval`` (``mmlu``): description "The following are multiple choice questions (with answers) about
  {subject}.\\n\\n", query "{question.strip()}\\nA. ..\\nD. ..\\nAnswer:", continuations " A" .. " D".
* ``modellink`` (``mmlu_eval.py``): "{few-shot}\\n\\n{question}\\nA. ..\\nD. ..\\nAnswer:"; the few-shot block
  of ``mmlu_5shot_template.json`` is "The following are multiple choice questions (with answers) about  {subject}.\\n"
  (two spaces) and the five dev rows "{question}\\nA. ..\\nD. ..\\nAnswer: {answer}" joined by "\\n", rebuilt here
  from the dev file (the template holds each subject's dev rows in file order). The answer is the last "X." on the
  first line of the lstripped text (``re.match(r".*(?P<answer>[A|B|C|D])\\..*")``), else its first character if it
  is one of "A|BCD"; no match is wrong.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence, Tuple

from aquila_npu.evaluation.exams import ExamTask
from aquila_npu.evaluation.subjects import mmlu_categories

# ModelLink's output_template1 / output_template2 (the character class includes "|").
ANSWER_PATTERNS = (r".*(?P<answer>[A|B|C|D])\..*", r"(?P<answer>[A|B|C|D])")


def modellink_mmlu_answer(text: str) -> Optional[str]:
    answer = text.lstrip()
    for pattern in ANSWER_PATTERNS:
        m = re.match(pattern, answer)
        if m:
            return m.group("answer")
    return None


class MMLU(ExamTask):
    name = "mmlu"
    description = "MMLU, 57 subjects of four-choice questions (accuracy)"
    header = False

    def lm_eval_description(self, subject: str) -> str:
        return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"

    def modellink_fewshot(self, subject: str, dev: Sequence[dict]) -> str:
        shots = "\n".join(f"{self.question_block(r)}\nAnswer: {r['answer']}" for r in dev[:5])
        header = f"The following are multiple choice questions (with answers) about  {subject.replace('_', ' ')}.\n"
        return header + shots

    def modellink_prompt(self, fewshot: str, row: dict) -> str:
        return f"{fewshot}\n\n{self.question_block(row)}\nAnswer:"

    def modellink_answer(self, generation: str, chat: bool) -> Optional[str]:
        return modellink_mmlu_answer(generation)

    def categories(self, subject: str) -> Tuple[str, ...]:
        return mmlu_categories(subject)
