"""``tools/preprocess_data.py``: tokenize parquet / json / jsonl documents into megatron-core indexed datasets.

    # pretraining: <prefix>_text_document.bin/.idx
    python tools/preprocess_data.py --input ./dataset/train-00000-of-00001-a09b74b3ef9c3b56.parquet \\
        --tokenizer-name-or-path ./model_from_hf/Aquila2-7B/ --output-prefix ./dataset/Aquila2-7B/alpaca \\
        --workers 4 --log-interval 1000 --tokenizer-type PretrainedFromHF
    # instruction tuning: <prefix>_packed_{input_ids,attention_mask,labels}_document.bin/.idx
    python tools/preprocess_data.py ... --handler-name GeneralInstructionHandler --append-eod

The main process reads rows (streaming) and writes the output; ``--workers N`` processes tokenize chunks of rows.
"""

import argparse
import gc
import multiprocessing
import os
import sys
import time
from collections import deque

from aquila_npu.errors import DataError

PROG = "preprocess_data.py"
_handler = None  # the worker process's handler (inherited through fork, or built by _init_worker)


def build_parser():
    from aquila_npu.data.handlers import HANDLERS, PRETRAIN
    from aquila_npu.data.templates import TEMPLATES
    from aquila_npu.data.tokenizer import TOKENIZER_TYPES

    p = argparse.ArgumentParser(
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
                   help="path prefix of the output files (its directory is created if missing)")
    g.add_argument("--dataset-impl", default="mmap", choices=["mmap"],
                   help="accepted for ModelLink compatibility; megatron-core's mmap format is the only one")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1,
                   help="number of tokenizing processes (default 1: tokenize in this process); each uses one "
                        "thread, so use about the number of cores")
    g.add_argument("--log-interval", type=int, default=100,
                   help="print progress (documents, docs/s, MB/s of input text) every this many documents "
                        "(default 100)")
    g.add_argument("--chunk-size", type=int, default=256,
                   help="documents sent to a worker at a time (default 256)")
    return p


def _init_worker(spec):
    global _handler
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if _handler is None:
        from aquila_npu.data.handlers import build_handler

        _handler = build_handler(spec)


def _encode(rows):
    return _handler.encode(rows)


def _chunks(rows, size, log_interval):
    """Lists of up to ``size`` rows, also cut at every multiple of ``log_interval`` so progress lines land on them."""
    chunk, n = [], 0
    for row in rows:
        chunk.append(row)
        n += 1
        if len(chunk) == size or n % log_interval == 0:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class Progress:
    """Progress lines every ``interval`` documents (stderr) and the final summary (stdout)."""

    def __init__(self, interval):
        self.interval = max(1, interval)
        self.start = time.perf_counter()
        self.docs = self.bytes = self.empty = 0
        self._next = self.interval

    def rates(self):
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return elapsed, self.docs / elapsed, self.bytes / elapsed / 1e6

    def update(self, encoded):
        self.docs += encoded.docs
        self.bytes += encoded.bytes
        self.empty += encoded.empty
        if self.docs >= self._next:
            _, dps, mbs = self.rates()
            print(f"Processed {self.docs} documents ({dps:.1f} docs/s, {mbs:.2f} MB/s).", file=sys.stderr, flush=True)
            self._next = (self.docs // self.interval + 1) * self.interval


def _results(handler, spec, rows, workers, chunk_size, log_interval):
    """Encoded chunks in input order: in this process for one worker, else from a pool with a bounded window."""
    if workers == 1:
        for chunk in _chunks(rows, chunk_size, log_interval):
            yield handler.encode(chunk)
        return
    global _handler
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    _handler = handler  # a forked worker inherits it instead of loading the tokenizer again
    gc.freeze()  # forked workers' garbage collection then leaves the parent's objects (and their pages) alone
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(spec,))
    try:
        pending = deque()
        for chunk in _chunks(rows, chunk_size, log_interval):
            pending.append(pool.submit(_encode, chunk))
            if len(pending) >= 4 * workers:  # a few chunks queued per worker, memory bounded
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool as err:
        raise RuntimeError(f"a --workers process died ({err}); out of memory? try fewer --workers") from None
    finally:
        _handler = None
        pool.shutdown(wait=True, cancel_futures=True)
        gc.unfreeze()


def run(args):
    """Preprocess as ``args`` (parsed flags) say; returns the output prefixes. Raises DataError for bad input."""
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process: --workers sets the parallelism
    try:
        return _run(args)
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def _run(args):
    from aquila_npu.data.handlers import PRETRAIN, HandlerSpec, build_handler
    from aquila_npu.data.sources import iter_rows, resolve_inputs
    from aquila_npu.data.tokenizer import load_tokenizer, vocab_size

    if args.workers < 1:
        raise DataError(f"--workers must be at least 1 (got {args.workers})")
    if args.log_interval < 1 or args.chunk_size < 1:
        raise DataError("--log-interval and --chunk-size must be at least 1")
    if args.handler_name == PRETRAIN and (args.prompt_type or args.conversation_key):
        raise DataError("--prompt-type / --conversation-key apply to --handler-name GeneralInstructionHandler only")
    spec = HandlerSpec(args.handler_name, args.tokenizer_name_or_path, use_fast=not args.tokenizer_not_use_fast,
                       json_keys=tuple(args.json_keys), append_eod=args.append_eod,
                       prompt_type=args.prompt_type or "alpaca", conversation_key=args.conversation_key)
    tokenizer = load_tokenizer(args.tokenizer_name_or_path, use_fast=spec.use_fast, tokenizer_type=args.tokenizer_type)
    handler = build_handler(spec, tokenizer)
    files = resolve_inputs(args.input)
    for path in files:
        if os.path.getsize(path) == 0:
            raise DataError(f"{path}: empty file (no rows)")

    from aquila_npu.data.writer import IndexedDatasetsWriter, token_dtype
    import numpy as np

    base = args.output_prefix + handler.prefix_suffix
    out_dir = os.path.dirname(os.path.abspath(base))
    os.makedirs(out_dir, exist_ok=True)
    tokens = handler.token_dtype or token_dtype(vocab_size(tokenizer))
    prefixes = {name: (f"{base}_{name}", tokens) for name in handler.outputs}
    print(f"{PROG}: {len(files)} input file(s), {args.handler_name}"
          f"{' (' + spec.prompt_type + ' template)' if args.handler_name != PRETRAIN else ''}, "
          f"{args.workers} worker(s)", file=sys.stderr, flush=True)
    progress = Progress(args.log_interval)
    with IndexedDatasetsWriter(prefixes) as writer:
        rows = iter_rows(files, handler.columns)
        for encoded in _results(handler, spec, rows, args.workers, args.chunk_size, args.log_interval):
            for name, (flat, lengths) in encoded.arrays.items():
                writer.add(name, flat, lengths)
            progress.update(encoded)
        if not any(writer.documents.values()):
            raise DataError(f"--input {args.input}: no non-empty documents in {progress.docs} rows")
    elapsed, dps, mbs = progress.rates()
    print(f"Done: {progress.docs} documents ({progress.empty} empty, skipped) in {elapsed:.2f} s: {dps:.1f} docs/s, "
          f"{mbs:.2f} MB/s, {args.workers} worker(s).")
    for name, (prefix, dtype) in prefixes.items():
        print(f"  {prefix}.bin/.idx: {writer.documents[name]} documents, {np.dtype(dtype).name}")
    return [p for p, _ in prefixes.values()]


def main(argv=None):
    """Command-line entry point; returns the exit status (0, or 2 for bad input)."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except DataError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
