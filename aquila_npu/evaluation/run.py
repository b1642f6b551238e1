"""Evaluating loaded tasks on a loaded model, across data-parallel replicas: the library half of the evaluate
command.

    runner = ModelRunner(scorer, generator, batch_size=...)
    for task, docs in loaded:                      # task.load() ran before the model was loaded
        records = evaluate(task, docs, runner)     # every rank gets all records, in document order
        summary = report.summarize(task, records, task.scoring)

Replica ``r`` of ``d`` scores documents ``r, r + d, r + 2d, ...``; a document's result does not depend on which
replica scores it or on what else is in its batch, so the records equal those of one process.
"""

from __future__ import annotations

import json
from typing import List, Sequence

from aquila_npu.evaluation.runner import ModelRunner
from aquila_npu.inference.session import gather, shard
from aquila_npu.outputs.files import atomic_file


def evaluate(task, docs: Sequence[dict], runner) -> List[dict]:
    """All records of ``docs`` (scored by this replica's share, gathered from every replica), in document order."""
    mine = shard(docs)
    records = task.score([d for _, d in mine], ModelRunner.of(runner), task.scoring)
    merged = gather({i: r for (i, _), r in zip(mine, records)})
    return [merged[i] for i in range(len(docs))]


def write_records(path: str, task, summary: dict, records: Sequence[dict], **meta) -> None:
    """The per-task JSON file: what was run, the summary, and every record."""
    with atomic_file(path, f"the {task.name} results") as f:
        json.dump({"task": task.name, "scoring": task.scoring, **meta, "summary": summary, "records": list(records)},
                  f, ensure_ascii=False, indent=1)
