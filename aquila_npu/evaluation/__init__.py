"""Benchmark evaluation of a loaded model, each task scored as lm-evaluation-harness does and as ModelLink does.

* ``tasks``: the registry, ``Task``, ``EvalOptions`` (the command's flags);
* one module per task: ``boolq``, ``mmlu`` / ``ceval`` / ``cmmlu`` (on ``exams``), ``gsm8k``, ``bbh``, ``agieval``,
  ``humaneval``; ``subjects`` holds the subject tables and categories, ``prompts/`` the reference harnesses' fixed
  few-shot text;
* ``protocols``: the request types (lm-eval's multiple choice and generate-until, ModelLink's generation), filters
  and metrics; ``runner``: the model behind them (``Scorer`` log-likelihoods from ``scoring``, batched generation);
* ``run``: data-parallel evaluation of a task; ``report``: per-subject / per-category summaries and tables;
* ``sandbox``: running model-written programs (HumanEval).
"""
