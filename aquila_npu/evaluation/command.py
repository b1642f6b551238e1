"""``python -m aquila_npu.evaluate``'s library call: tasks loaded and checked, then the model, then each task scored
(``evaluation.run``) and reported (``evaluation.report``); ``--output`` / ``--output-dir`` get every per-example
record. torch and megatron-core are imported once the flags, tasks and data are checked."""

from __future__ import annotations

import argparse
import os
from typing import List, Optional

from aquila_npu.errors import OutputError, UsageError
from aquila_npu.evaluation import report
from aquila_npu.evaluation.tasks import EvalOptions, get_task, summarize, task_names
from aquila_npu.flags import inert_note
from aquila_npu.inference.options import model_options
from aquila_npu.ranks import print0

PROG = "python -m aquila_npu.evaluate"


def data_paths(spec: Optional[str], n: int) -> List[Optional[str]]:
    """--task-data-path for ``n`` tasks: one entry per task (an empty one: the task's default)."""
    if spec is None:
        return [None] * n
    parts = [part.strip() or None for part in spec.split(",")]
    if len(parts) != n:
        raise UsageError(f"--task-data-path {spec}: {len(parts)} path(s) for {n} task(s); give one per task, "
                         "comma-separated in --task's order")
    return parts


def options(args: argparse.Namespace) -> EvalOptions:
    return EvalOptions(scoring=args.scoring, max_new_tokens=args.max_new_tokens, num_fewshot=args.num_fewshot,
                       max_eval_samples=args.max_eval_samples, batch_size=args.evaluation_batch_size,
                       eval_language=args.eval_language, prompt_type=args.prompt_type,
                       instruction_template=args.instruction_template, no_chat_template=args.no_chat_template,
                       num_samples=args.num_samples, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                       timeout=args.execution_timeout)


def prepare(args: argparse.Namespace):
    """Tasks, options, outputs and data checked (no torch): the task names, tasks, their rows and data paths. The
    pre-flight (``aquila_npu.preflight``) runs this too."""
    names = task_names(args.task)
    if args.output and len(names) > 1:
        raise UsageError(f"--output {args.output}: {len(names)} tasks; use --output-dir DIR (one file per task)")
    if args.output_dir:  # every output checked before any work (each task's file must be able to become a file)
        for name in names:
            out = os.path.join(args.output_dir, f"{name}.json")
            if os.path.isdir(out):
                raise OutputError(f"--output-dir {args.output_dir}: {out} is a folder; it would receive {name}'s "
                                  "records: move it, or choose another --output-dir")
    paths = data_paths(args.task_data_path, len(names))
    tasks = [get_task(n, options(args)) for n in names]  # bad option values: one line, before any model
    docs = [task.load(path, args.limit) for task, path in zip(tasks, paths)]  # data errors: before any model
    return names, tasks, docs, paths


def evaluate(args: argparse.Namespace) -> int:
    """Evaluate as the parsed flags say (``aquila_npu.cli.evaluate``): tasks, options and data checked first, torch and
    megatron-core imported only then."""
    names, tasks, docs, paths = prepare(args)
    # torch and megatron-core only now (--help and input errors answer without them)
    from aquila_npu.compat.torch import import_megatron_core

    import_megatron_core()  # before anything else imports it: its torch.compile decorations wait for first use
    from aquila_npu.evaluation.run import evaluate as evaluate_task, write_records
    from aquila_npu.evaluation.runner import ModelRunner
    from aquila_npu.evaluation.scoring import Scorer
    from aquila_npu.inference.generation import TextGenerator
    from aquila_npu.inference.session import Session

    session = Session.start(model_options(args))
    loaded, progress = session.loaded, session.is_rank0 and not args.no_progress
    scorer = Scorer(loaded.model, session.tokenizer, vocab_size=loaded.vocab_size, max_length=session.max_length,
                    batch_size=args.micro_batch_size or 8, device=session.device.torch_device,
                    pad_id=session.pad_id(), progress=progress)
    generator = TextGenerator.from_loaded(loaded, session.device.torch_device, max_sequence_length=session.max_length)
    runner = ModelRunner(scorer, generator, batch_size=args.evaluation_batch_size, progress=progress)
    print0(f"{PROG}: {', '.join(f'{t.name} ({len(d)} rows, scoring {t.scoring})' for t, d in zip(tasks, docs))}; "
           f"{session.describe()} ({session.device.backend.describe()})" + inert_note(args))
    for task, task_docs, path in zip(tasks, docs, paths):
        scorer.desc = f"{task.name} ({task.scoring})"
        records = evaluate_task(task, task_docs, runner)
        summary = report.summarize(task, records, task.scoring)
        if not session.is_rank0:
            continue
        print(report.format_table(summary, task.metric_names(task.scoring)), flush=True)
        counts = summarize(records)
        print(f"{task.name} ({task.scoring}): accuracy {counts['accuracy']:.4f} "
              f"({counts['correct']}/{counts['total']} correct)", flush=True)
        out = args.output or (os.path.join(args.output_dir, f"{task.name}.json") if args.output_dir else None)
        if out:
            write_records(out, task, summary, records, data=path, load=loaded.load_dir, **counts)
            print(f"{PROG}: wrote {out}", flush=True)
    return 0
