"""The whole job on a CPU in minutes, with the same commands users run on NPUs:

    python -m aquila_npu.demo [--workdir ./aquila_npu_demo] [--short]

1. writes a synthetic corpus of short passages with yes/no questions whose answer only the passage tells, and a
   held-out BoolQ-format question set;
2. trains a byte-level BPE tokenizer on it (``tokenizers``);
3. ``tools/preprocess_data.py``: corpus -> megatron-core indexed dataset;
4. ``aquila_npu.pretrain``: trains aquila2-tiny (Aquila2-shaped: RMSNorm, SwiGLU, RoPE, GQA) from scratch;
5. ``tools/checkpoint/convert_ckpt.py``: Megatron -> Hugging Face (``mg2hg/``), then HF -> Megatron tp2;
6. ``aquila_npu.generate``: greedy answers from the tp2 checkpoint on 2 processes;
7. ``aquila_npu.evaluate --task boolq``: accuracy on the held-out questions (never seen in training), which must be
   clearly above chance (50%).

Every step prints the command it runs. ``--short`` (CI) trains briefly and does not require the accuracy.
"""

from __future__ import annotations

import argparse
import sys

from aquila_npu.cli.common import Parser, run_cli
from aquila_npu.flags import check_positive

PROG = "python -m aquila_npu.demo"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="aquila_npu_demo", help="where everything is written (replaced)")
    p.add_argument("--short", action="store_true", help="a quick pass through every step (CI); no accuracy check")
    p.add_argument("--train-iters", type=int, default=None, help="training iterations (default 400; 20 with --short)")
    return p


def parse(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    check_positive(args, "train_iters")
    return args


def main(argv=None) -> int:
    return run_cli(PROG, parse, "aquila_npu.jobs.demo:run", argv)


if __name__ == "__main__":
    sys.exit(main())
