"""Benchmark evaluation of a converted Megatron checkpoint (the tasks of ``aquila_npu.evaluation.tasks``).

    torchrun --nproc-per-node 8 -m aquila_npu.evaluate --task boolq --task-data-path ./boolq/test \\
        --load ./model_weights/Aquila2-7B-v0.1-tp8-pp1 --tokenizer-name-or-path ./model_from_hf/Aquila2-7B \\
        --scoring first-token --output boolq.json

``--task-data-path``: a ``.jsonl`` file or a folder (every ``*.jsonl`` / ``*.json`` file in it). Scorings:
``loglikelihood`` (default; lm-evaluation-harness's: compare log p(" yes") with log p(" no")) and ``first-token``
(ModelLink's, behind the published Aquila2 BoolQ figures: compare the next-token probabilities of "Yes" and "No").
Rank 0 shows progress and prints accuracy and counts (overall and per file); ``--output`` also gets every
prediction. With more processes than tensor x pipeline parallel ranks, the data-parallel replicas share the rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from aquila_npu.cli import inference_args
from aquila_npu.cli.common import check_output_file, inert_note, print0, run_cli
from aquila_npu.errors import UsageError
from aquila_npu.evaluation.scoring import Scorer
from aquila_npu.evaluation.tasks import get_task, load_tasks, summarize
from aquila_npu.inference.session import Session

PROG = "python -m aquila_npu.evaluate"


def build_parser() -> argparse.ArgumentParser:
    tasks = load_tasks()
    p = argparse.ArgumentParser(prog=PROG, description="Evaluate an Aquila2 Megatron checkpoint on a benchmark.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    inference_args.add_arguments(p)
    t = p.add_argument_group("task")
    t.add_argument("--task", required=True, type=str.lower, choices=sorted(tasks),
                   help="; ".join(f"{n}: {c.description}" for n, c in sorted(tasks.items())))
    t.add_argument("--task-data-path", required=True, metavar="FILE_OR_DIR",
                   help="the task's data: a .jsonl file, or a folder whose .jsonl/.json files are all read")
    t.add_argument("--scoring", default=None,
                   help="how answers are scored; boolq: loglikelihood (default, lm-evaluation-harness) or "
                        "first-token (ModelLink, as behind the published Aquila2 figures)")
    t.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows")
    t.add_argument("--output", metavar="FILE.json", default=None,
                   help="write accuracy, counts and every prediction as JSON")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--max-new-tokens", type=int, default=None,
                   help="ignored (accepted for ModelLink's evaluate scripts, which pass 1)")
    return p


def run(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    task = get_task(args.task)
    scoring = args.scoring or task.scorings[0]
    if scoring not in task.scorings:
        raise UsageError(f"--scoring {scoring}: {task.name} offers {', '.join(task.scorings)}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit {args.limit} must be >= 1")
    check_output_file("--output", args.output)
    docs = task.load(args.task_data_path, args.limit)  # data errors before any model is loaded
    session = Session.start(inference_args.model_options(args))
    loaded = session.loaded
    mine = session.shard(docs)
    scorer = Scorer(loaded.model, session.tokenizer, vocab_size=loaded.vocab_size, max_length=session.max_length,
                    batch_size=args.micro_batch_size or 8, device=session.device.torch_device,
                    pad_id=session.pad_id(), progress=session.is_rank0 and not args.no_progress,
                    desc=f"{task.name} ({scoring})")
    print0(f"{PROG}: {task.name}, {len(docs)} rows from {args.task_data_path}, scoring {scoring}; "
           f"{session.describe()}" + inert_note(args, inference_args.INERT))
    predictions = task.score([d for _, d in mine], scorer, scoring)
    by_index = session.gather({i: p for (i, _), p in zip(mine, predictions)})
    predictions = [by_index[i] for i in sorted(by_index)]
    summary = summarize(predictions)
    report = {"task": task.name, "scoring": scoring, "data": args.task_data_path, "load": loaded.load_dir,
              **summary, "predictions": predictions}
    if session.is_rank0:
        for f, s in summary["per_file"].items():
            print(f"  {f}: accuracy {s['accuracy']:.4f} ({s['correct']}/{s['total']})")
        print(f"{task.name} ({scoring}): accuracy {summary['accuracy']:.4f} "
              f"({summary['correct']}/{summary['total']} correct)", flush=True)
        if args.output:
            with open(args.output, "w", encoding="utf-8") as f:
                json.dump(report, f, ensure_ascii=False, indent=1)
            print(f"{PROG}: wrote {args.output}", flush=True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """The command: ``run`` with input errors as one line and exit status 2."""
    return run_cli(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
