"""Text generation from a converted Megatron checkpoint, any tensor/pipeline-parallel layout.

    torchrun --nproc-per-node 8 -m aquila_npu.generate --load ./model_weights/Aquila2-7B-v0.1-tp8-pp1 \\
        --tokenizer-name-or-path ./model_from_hf/Aquila2-7B --prompt "What is the capital of China?" \\
        --max-new-tokens 128 --greedy
    python -m aquila_npu.generate --load CKPT --tokenizer-name-or-path TOK --prompts-file prompts.txt \\
        --micro-batch-size 4 --temperature 0.7 --top-p 0.9 --output out.jsonl
    ... --chat                      # AquilaChat2 conversation template (see aquila_npu/inference/chat.py)

Rank 0 prints the text as it is generated (token by token with one prompt per batch; each prompt's text at the end
of its batch otherwise). ``--output`` writes one JSON line per prompt, in input order: ``prompt``, ``text``,
``token_ids`` (the generated ids, without the EOS that ended them) and ``finish_reason`` ("eos" or "length").
With more processes than tensor x pipeline parallel ranks, the data-parallel replicas share the prompts.

torch, megatron-core and transformers are imported once the flags and prompts are checked (``--help`` and input errors
take a fraction of a second).
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from aquila_npu.cli import inference_args
from aquila_npu.cli.common import Parser, run_cli
from aquila_npu.errors import UsageError
from aquila_npu.inference.chat import CHAT_TEMPLATES
from aquila_npu.outputs.files import check_target

PROG = "python -m aquila_npu.generate"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="Generate text with an Aquila2 Megatron checkpoint.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    inference_args.add_arguments(p)
    g = p.add_argument_group("prompts")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", metavar="TEXT",
                     help="a prompt (repeat the flag for several)")
    src.add_argument("--prompts-file", metavar="FILE",
                     help="prompts, one per line; or a .jsonl file with a 'prompt' field per line")
    g.add_argument("--chat", action="store_true",
                   help="wrap each prompt in the AquilaChat2 conversation template (for the chat models)")
    g.add_argument("--chat-template", choices=CHAT_TEMPLATES, default=None,
                   help="template for --chat (default: the checkpoint's, which the converter takes from FlagAI's "
                        "choice for the model's name: aquila-v1 for AquilaChat2-7B, aquila-legacy for 34B, aquila for "
                        "the 16K models; else aquila-chat; alpaca for a model fine-tuned with ModelLink's alpaca "
                        "template)")
    g.add_argument("--system-prompt", default=None, help="replace the template's system prompt (with --chat)")
    s = p.add_argument_group("decoding")
    s.add_argument("--max-new-tokens", type=int, default=512, help="most tokens to generate per prompt")
    s.add_argument("--greedy", action="store_true",
                   help="always take the most likely token (the default when no sampling flag is given)")
    s.add_argument("--temperature", type=float, default=None, help="sample with this temperature (> 0)")
    s.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (0 = all)")
    s.add_argument("--top-p", type=float, default=None, help="sample from the smallest set with this probability")
    s.add_argument("--seed", type=int, default=1234, help="random seed for sampling")
    s.add_argument("--eos-token-id", type=int, default=None,
                   help="stop a prompt at this token id (default: the tokenizer's EOS, e.g. </s> for Aquila2)")
    s.add_argument("--no-kv-cache", action="store_true",
                   help="recompute the whole sequence at every step instead of using the KV cache (slow; for "
                        "comparisons)")
    o = p.add_argument_group("output")
    o.add_argument("--output", metavar="FILE.jsonl", default=None,
                   help="write {prompt, text, token_ids, finish_reason} per prompt, one JSON line each")
    return p


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if args.output:
        check_target("--output", args.output)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    """The command: flags, then ``aquila_npu.inference.command.generate``."""
    return run_cli(PROG, parse, "aquila_npu.inference.command:generate", argv)


if __name__ == "__main__":
    sys.exit(main())
