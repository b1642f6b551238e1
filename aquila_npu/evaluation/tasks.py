"""The registry of evaluation tasks. A task reads its documents and scores them through a ``Scorer``.

Adding a task: subclass ``Task`` in a module of this package, decorate it with ``@register`` and import the module
in ``load_tasks`` below; ``python -m aquila_npu.evaluate --task NAME`` then finds it.
"""

from __future__ import annotations

import abc
import importlib
from typing import Dict, List, Optional, Sequence, Tuple, Type

TASKS: Dict[str, Type["Task"]] = {}
TASK_MODULES = ("aquila_npu.evaluation.boolq",)


class Task(abc.ABC):
    name: str = ""
    description: str = ""
    scorings: Tuple[str, ...] = ("loglikelihood",)  # the first is the default

    @abc.abstractmethod
    def load(self, path: str, limit: Optional[int] = None) -> List[dict]:
        """The documents (each with ``file`` and ``line``) of ``path`` (a file or a folder); the first ``limit``."""

    @abc.abstractmethod
    def score(self, docs: Sequence[dict], scorer, scoring: str) -> List[dict]:
        """One prediction per document: a dict with at least ``correct`` (bool)."""


def register(cls: Type[Task]) -> Type[Task]:
    if not cls.name or cls.name in TASKS:
        raise ValueError(f"task name {cls.name!r} is empty or already registered")
    TASKS[cls.name] = cls
    return cls


def load_tasks() -> Dict[str, Type[Task]]:
    for module in TASK_MODULES:
        importlib.import_module(module)
    return TASKS


def get_task(name: str) -> Task:
    tasks = load_tasks()
    try:
        return tasks[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(tasks))}") from None


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
