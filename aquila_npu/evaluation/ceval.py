"""C-Eval (Huang et al. 2023): 52 subjects, the ``ceval-exam`` CSV files with a header (id, question, A, B, C, D,
answer, explanation): evaluate ``val/{subject}_val.csv`` (the test split has no answers), few-shot from
``dev/{subject}_dev.csv``.

* ``lm-eval`` (``ceval-valid``): description "以下是中国关于{学科}的单项选择题，请选出其中的正确答案。\\n\\n", query
  "{question.strip()}\\nA. ..\\nD. ..\\n答案：", continuations " A" .. " D"; ``acc`` and ``acc_norm``.
* ``modellink`` (``ceval_exam.py``): "{few-shot}\\n\\n问：{question}\\nA. ..\\nD. ..\\n答："; the few-shot block of
  ``ceval_5shot_template.json`` is "请从下列选择题中选择正确的选项。\\n\\n" and the five dev rows
  "问：{question}\\nA. ..\\nD. ..\\n答：{answer}" joined by "\\n\\n", rebuilt here from the dev file. The answer is the
  whole generated text, stripped, equal to the answer letter (so ``--max-new-tokens`` 1 or 2); with ``--prompt-type``
  the first capital letter.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

from aquila_npu.evaluation.exams import ExamTask, first_capital
from aquila_npu.evaluation.subjects import CEVAL, ceval_categories


class CEval(ExamTask):
    name = "ceval"
    description = "C-Eval, 52 Chinese exam subjects of four-choice questions (accuracy)"
    lm_eval_answer_cue = "答案："

    known_subjects = CEVAL

    def lm_eval_description(self, subject: str) -> str:
        return f"以下是中国关于{CEVAL[subject][0]}的单项选择题，请选出其中的正确答案。\n\n"

    def modellink_fewshot(self, subject: str, dev: Sequence[dict]) -> str:
        shots = "\n\n".join(f"问：{self.question_block(r)}\n答：{r['answer']}" for r in dev[:5])
        return f"请从下列选择题中选择正确的选项。\n\n{shots}"

    def modellink_prompt(self, fewshot: str, row: dict) -> str:
        return f"{fewshot}\n\n问：{self.question_block(row)}\n答："

    def modellink_answer(self, generation: str, chat: bool) -> Optional[str]:
        return first_capital(generation) if chat else generation.strip()

    def modellink_correct(self, prediction: Optional[str], answer: str) -> bool:
        return prediction is not None and prediction.strip() == answer.strip()

    def categories(self, subject: str) -> Tuple[str, ...]:
        return ceval_categories(subject)
