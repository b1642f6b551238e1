"""``tools/preprocess_data.py`` (also ``aquila-preprocess``): tokenize parquet / json / jsonl documents into
megatron-core indexed datasets, with ModelLink's flags. The work: ``aquila_npu.data.preprocess``.

    # pretraining: <prefix>_text_document.bin/.idx
    python tools/preprocess_data.py --input ./dataset/train-00000-of-00001-a09b74b3ef9c3b56.parquet \\
        --tokenizer-name-or-path ./model_from_hf/Aquila2-7B/ --output-prefix ./dataset/Aquila2-7B/alpaca \\
        --workers 4 --log-interval 1000 --tokenizer-type PretrainedFromHF
    # instruction tuning: <prefix>_packed_{input_ids,attention_mask,labels}_document.bin/.idx
    python tools/preprocess_data.py ... --handler-name GeneralInstructionHandler --append-eod
"""

import argparse
import os
import sys

from aquila_npu.cli.common import Parser, run_cli
from aquila_npu.errors import UsageError
from aquila_npu.data.preprocess import PROG
from aquila_npu.flags import add_inert_arguments

INERT = ("--dataset-impl", "--pack", "--neat-pack", "--seq-length")


def build_parser():
    from aquila_npu.data.handlers import HANDLERS, PRETRAIN
    from aquila_npu.data.templates import TEMPLATES
    from aquila_npu.data.tokenizer import TOKENIZER_TYPES

    p = Parser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tokenize parquet / json / jsonl documents into megatron-core indexed datasets (.bin/.idx) for "
                    "Aquila2 pretraining or instruction tuning. Flags and output names follow ModelLink.",
        epilog="Outputs (megatron-core IndexedDataset format, readable by its IndexedDataset and GPTDataset):\n"
               "  GeneralPretrainHandler:    <prefix>_<key>_document.bin/.idx for each --json-keys key\n"
               "                             (training: --data-path <prefix>_text_document)\n"
               "  GeneralInstructionHandler: <prefix>_packed_input_ids_document,\n"
               "                             <prefix>_packed_attention_mask_document,\n"
               "                             <prefix>_packed_labels_document (labels = -100 over the prompt)\n"
               "                             (training: --data-path <prefix>)\n"
               "Prompt templates (--prompt-type):\n" +
               "".join(f"  {name:14s} {t.doc}\n" for name, t in TEMPLATES.items()) +
               "Bad input (missing file or column, empty file, invalid UTF-8 or JSON, unloadable tokenizer) stops the\n"
               "run with a message naming the flag or file and exit status 2; nothing is left at the output names.\n"
               "See docs/data.md.")
    g = p.add_argument_group("input")
    g.add_argument("--input", required=True,
                   help="a .parquet, .json (JSON lines or one JSON array) or .jsonl file, a directory of them, or a "
                        "glob pattern (quote it); read as a stream, in sorted file order")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="GeneralPretrainHandler: the text column(s) to tokenize, one output dataset each "
                        "(default: text)")
    g.add_argument("--handler-name", default=PRETRAIN, choices=HANDLERS,
                   help=f"{PRETRAIN} (default): each document's text; GeneralInstructionHandler: alpaca-style "
                        "instruction / input / output rows rendered with --prompt-type, labels masked on the prompt")
    g.add_argument("--prompt-type", default=None, choices=list(TEMPLATES),
                   help="GeneralInstructionHandler: the prompt template (default: alpaca, ModelLink's); the aquila-* "
                        "templates are AquilaChat2's conversation formats")
    g.add_argument("--conversation-key", default=None, metavar="COLUMN",
                   help="GeneralInstructionHandler: read multi-turn conversations from this column (a list of "
                        "{from: human|gpt, value} or {role: user|assistant, content} turns, optional first system "
                        "turn) instead of the instruction / input / output columns")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", default="PretrainedFromHF", choices=TOKENIZER_TYPES,
                   help="only PretrainedFromHF (a Hugging Face tokenizer directory)")
    g.add_argument("--tokenizer-name-or-path", required=True,
                   help="the Hugging Face model or tokenizer directory (e.g. ./model_from_hf/Aquila2-7B/); never "
                        "downloads")
    g.add_argument("--tokenizer-not-use-fast", action="store_true",
                   help="load the tokenizer with use_fast=False (the Python implementation where transformers still "
                        "has one; ModelLink's generate / evaluate scripts pass it)")
    g.add_argument("--append-eod", action="store_true",
                   help="append the end-of-document token (the tokenizer's eos, </s> = 100007 for Aquila2) to every "
                        "document; for instruction data it is trained (label kept), and not added twice when the "
                        "template already ends the answer with it")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True,
                   help="path prefix of the output files, e.g. ./dataset/alpaca (not a folder: the outputs are "
                        "<prefix>_<key>_document.bin/.idx); its directory is created if missing")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1,
                   help="number of tokenizing processes (default 1: tokenize in this process); each uses one "
                        "thread, so use about the number of cores")
    g.add_argument("--log-interval", type=int, default=100,
                   help="print progress (documents, docs/s, MB/s of input text) every this many documents "
                        "(default 100)")
    g.add_argument("--chunk-size", type=int, default=256,
                   help="documents sent to a worker at a time (default 256)")
    add_inert_arguments(p, INERT)
    return p


def parse(argv=None) -> argparse.Namespace:
    from aquila_npu.data.handlers import PRETRAIN

    args = build_parser().parse_args(argv)
    if os.path.basename(args.output_prefix) in ("", ".", ".."):
        raise UsageError(f"--output-prefix {args.output_prefix}: names a folder, not a path prefix; the outputs are "
                         f"<prefix>_<key>_document.bin/.idx, e.g. --output-prefix "
                         f"{os.path.join(args.output_prefix, 'corpus')}")
    pack = "--pack" if args.pack else "--neat-pack" if args.neat_pack else None
    if pack and args.handler_name == PRETRAIN:
        raise UsageError(f"{pack} packs instruction samples (--handler-name GeneralInstructionHandler); pretraining "
                         "documents are split at their EOD in training instead: --append-eod here, pretrain "
                         "--reset-attention-mask there")
    if args.neat_pack and not args.pack:
        raise UsageError("--neat-pack needs --pack (as in MindSpeed-LLM)")
    return args


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status (0, or 2 for bad input)."""
    return run_cli(PROG, parse, "aquila_npu.data.preprocess:command", argv)


if __name__ == "__main__":
    sys.exit(main())
