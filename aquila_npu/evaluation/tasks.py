"""The registry of evaluation tasks. A task reads its documents, builds each prompt as its reference harness does,
runs them through a ``runner.ModelRunner`` and scores the answers.

Adding a task: subclass ``Task`` (with its ``name``) in a module of this package and list the module in
``TASK_MODULES`` below, once; the registry finds the task classes defined there, and the evaluate command then finds
the task. (The list is what keeps ``--help`` fast: only task modules are imported, never the model runner.)

The contract with the command (data-parallel replicas share the documents):

    task = get_task("mmlu", EvalOptions(scoring="modellink"))
    docs = task.load(path)                   # every data error here, before any model is loaded
    mine = docs[dp_rank::dp]                 # any split: a document's result does not depend on the others
    records = task.score(mine, runner, task.scoring)
    report.summarize(task, gathered_records)

Scorings: every task offers ``lm-eval`` (lm-evaluation-harness's prompts, few-shot selection, log-likelihood or
generation, filters and metrics) and ``modellink`` (ModelLink / MindSpeed-LLM's ``evaluation.py``); BoolQ's older
names ``loglikelihood`` and ``first-token`` are the same two.
"""

from __future__ import annotations

import abc
import functools
import importlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Type

from aquila_npu.errors import UsageError

TASK_MODULES = ("aquila_npu.evaluation.boolq", "aquila_npu.evaluation.mmlu", "aquila_npu.evaluation.ceval",
                "aquila_npu.evaluation.cmmlu", "aquila_npu.evaluation.gsm8k", "aquila_npu.evaluation.bbh",
                "aquila_npu.evaluation.agieval", "aquila_npu.evaluation.humaneval")


@dataclass(frozen=True)
class EvalOptions:
    """What the evaluate command's flags set (ModelLink's spellings in the comments). ``None``: the scoring's own
    default for the task."""

    scoring: Optional[str] = None  # --scoring
    max_new_tokens: Optional[int] = None  # --max-new-tokens
    num_fewshot: Optional[int] = None  # --num-fewshot (lm-eval scoring; lm-eval's --num_fewshot)
    max_eval_samples: Optional[int] = None  # --max-eval-samples: the first N rows of each data file
    batch_size: Optional[int] = None  # --evaluation-batch-size (generation rows per batch)
    eval_language: str = "en"  # --eval-language (ModelLink chat prompts: en | zh)
    prompt_type: Optional[str] = None  # --prompt-type: a chat template name (ModelLink's chat few-shot variant)
    instruction_template: Optional[str] = None  # --instruction-template (HumanEval, ModelLink scoring)
    no_chat_template: bool = False  # --no-chat-template (ModelLink applies the tokenizer's chat template if any)
    num_samples: int = 1  # --num-samples (HumanEval pass@k; > 1 samples with temperature / top_p)
    temperature: float = 0.2  # --temperature for --num-samples > 1 (lm-eval's humaneval_64)
    top_p: float = 0.95  # --top-p for --num-samples > 1
    seed: int = 1234  # --seed (lm-eval's few-shot seed; ModelLink's --seed; sampling)
    timeout: Optional[float] = None  # --execution-timeout: seconds per HumanEval program


class Task(abc.ABC):
    name: str = ""
    description: str = ""
    scorings: Tuple[str, ...] = ("lm-eval", "modellink")  # the first is the default
    aliases: Dict[str, str] = {}  # another name -> a scoring of ``scorings``

    def __init__(self, options: Optional[EvalOptions] = None):
        self.options = options or EvalOptions()
        self.scoring = self.resolve_scoring(self.options.scoring)
        check_options(self.options, self.scoring)

    def resolve_scoring(self, scoring: Optional[str]) -> str:
        if scoring is None:
            return self.scorings[0]
        scoring = self.aliases.get(scoring, scoring)
        if scoring not in self.scorings:
            names = (*self.scorings, *self.aliases)
            raise UsageError(f"--scoring {scoring}: {self.name} offers {', '.join(names)}")
        return scoring

    def checked_scoring(self, scoring: Optional[str]) -> str:
        """The scoring ``score`` was asked for: the one the documents were loaded for (``load`` builds the prompts
        of ``self.scoring``)."""
        scoring = self.scoring if scoring is None else self.resolve_scoring(scoring)
        if scoring != self.scoring:
            raise UsageError(f"--scoring {scoring}: the {self.name} data were loaded for the {self.scoring} scoring "
                             f"(build the task with EvalOptions(scoring={scoring!r}))")
        return scoring

    @abc.abstractmethod
    def load(self, path: Optional[str], limit: Optional[int] = None) -> List[dict]:
        """The documents (each with ``file`` and ``line``) of ``path`` (a file or a folder); the first ``limit``.
        Everything the task's scoring needs is read and checked here."""

    @abc.abstractmethod
    def score(self, docs: Sequence[dict], runner, scoring: Optional[str] = None) -> List[dict]:
        """One record per document: ``file``, ``line``, ``subject``, ``prompt``, ``target``, ``prediction``,
        ``correct`` (bool) and ``metrics`` (name -> value, averaged by ``report``). ``runner``: a
        ``runner.ModelRunner`` or a ``scoring.Scorer``."""

    def metric_names(self, scoring: str) -> Tuple[str, ...]:
        """The metrics of a record, headline first."""
        return ("acc",)

    def categories(self, subject: str) -> Tuple[str, ...]:
        """The report groups a subject's results under these categories (none: no category table)."""
        return ()


def check_options(options: EvalOptions, scoring: str) -> None:
    """The checks of the flags that need no data."""
    from aquila_npu.data.templates import TEMPLATES

    for name in ("max_new_tokens", "max_eval_samples", "batch_size", "num_samples"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} {value} must be >= 1")
    if options.prompt_type is not None:
        if options.prompt_type not in TEMPLATES:
            raise UsageError(f"--prompt-type {options.prompt_type}: not a chat template; choose one of "
                             f"{', '.join(sorted(TEMPLATES))}")
        if scoring not in ("modellink", "first-token"):
            raise UsageError(f"--prompt-type is an option of the modellink scoring, not of {scoring}")
    if options.eval_language not in ("en", "zh"):
        raise UsageError(f"--eval-language {options.eval_language}: choose en or zh")
    if options.timeout is not None and options.timeout <= 0:
        raise UsageError(f"--execution-timeout {options.timeout} must be > 0")


@functools.lru_cache(maxsize=None)
def _registry(modules: Tuple[str, ...]) -> Dict[str, Type[Task]]:
    tasks: Dict[str, Type[Task]] = {}
    for name in modules:
        module = importlib.import_module(name)
        for cls in vars(module).values():
            if isinstance(cls, type) and issubclass(cls, Task) and cls.__module__ == name and cls.name:
                if cls.name in tasks:
                    raise ValueError(f"task name {cls.name!r}: {tasks[cls.name].__module__} and {name}")
                tasks[cls.name] = cls
    return tasks


def load_tasks() -> Dict[str, Type[Task]]:
    """{name: task class} of every task of ``TASK_MODULES``."""
    return dict(_registry(tuple(TASK_MODULES)))


def get_task(name: str, options: Optional[EvalOptions] = None) -> Task:
    tasks = load_tasks()
    try:
        cls = tasks[name.lower()]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(tasks))}") from None
    return cls(options)


def task_names(spec: str) -> List[str]:
    """``--task mmlu,ceval`` (ModelLink also takes them space-separated): the task names, checked."""
    tasks = load_tasks()
    names = [n.strip().lower() for part in spec.split(",") for n in part.split()]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in tasks]
    if unknown or not names:
        raise UsageError(f"--task {spec}: unknown task {', '.join(unknown) or '(none)'}; known: "
                         f"{', '.join(sorted(tasks))}")
    return list(dict.fromkeys(names))


def summarize(predictions: Sequence[dict]) -> dict:
    """Accuracy and counts, overall and per data file."""
    per_file: Dict[str, List[int]] = {}
    for p in predictions:
        c = per_file.setdefault(p["file"], [0, 0])
        c[0] += bool(p["correct"])
        c[1] += 1
    correct = sum(c for c, _ in per_file.values())
    total = sum(n for _, n in per_file.values())
    return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total,
            "per_file": {f: {"accuracy": c / n, "correct": c, "total": n} for f, (c, n) in per_file.items()}}
