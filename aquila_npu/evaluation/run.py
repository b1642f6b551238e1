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

import torch

from aquila_npu.evaluation.runner import ModelRunner, reporting_rank


def _data_parallel():
    if not torch.distributed.is_initialized():
        return 0, 1
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()


def evaluate(task, docs: Sequence[dict], runner) -> List[dict]:
    """All records of ``docs`` (scored by this replica's share, gathered from every replica)."""
    rank, size = _data_parallel()
    mine = list(range(rank, len(docs), size))
    records = task.score([docs[i] for i in mine], ModelRunner.of(runner), task.scoring)
    if not torch.distributed.is_initialized():
        return records
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, list(zip(mine, records)) if reporting_rank() else [])
    merged = dict(pair for part in gathered for pair in part)
    return [merged[i] for i in range(len(docs))]


def write_records(path: str, task, summary: dict, records: Sequence[dict], **meta) -> None:
    """The per-task JSON file: what was run, the summary, and every record."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"task": task.name, "scoring": task.scoring, **meta, "summary": summary, "records": list(records)},
                  f, ensure_ascii=False, indent=1)
