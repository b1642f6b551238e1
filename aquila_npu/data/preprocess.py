"""Tokenize parquet / json / jsonl documents into megatron-core indexed datasets: the work behind
``tools/preprocess_data.py`` (its flags: ``aquila_npu.cli.preprocess``).

The main process reads rows (streaming) and writes the output; ``--workers N`` processes tokenize chunks of rows.
"""

import gc
import multiprocessing
import os
import sys
import time
from collections import deque

from aquila_npu.errors import DataError
from aquila_npu.flags import inert_note

PROG = "preprocess_data.py"  # how progress lines name the tool
_handler = None  # the worker process's handler (inherited through fork, or built by _init_worker)


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


def command(args) -> int:
    """``tools/preprocess_data.py``'s library call: ``run``, exit status 0."""
    run(args)
    return 0


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
    from aquila_npu.data.tokenizer import check_tokenizer_path, load_tokenizer, vocab_size

    if args.workers < 1:
        raise DataError(f"--workers must be at least 1 (got {args.workers})")
    if args.log_interval < 1 or args.chunk_size < 1:
        raise DataError("--log-interval and --chunk-size must be at least 1")
    if args.handler_name == PRETRAIN and (args.prompt_type or args.conversation_key):
        raise DataError("--prompt-type / --conversation-key apply to --handler-name GeneralInstructionHandler only")
    spec = HandlerSpec(args.handler_name, args.tokenizer_name_or_path, use_fast=not args.tokenizer_not_use_fast,
                       json_keys=tuple(args.json_keys), append_eod=args.append_eod,
                       prompt_type=args.prompt_type or "alpaca", conversation_key=args.conversation_key)
    check_tokenizer_path(args.tokenizer_name_or_path, args.tokenizer_type)  # path errors before transformers loads
    files = resolve_inputs(args.input)
    for path in files:
        if os.path.getsize(path) == 0:
            raise DataError(f"{path}: empty file (no rows)")
    tokenizer = load_tokenizer(args.tokenizer_name_or_path, use_fast=spec.use_fast, tokenizer_type=args.tokenizer_type)
    handler = build_handler(spec, tokenizer)

    from aquila_npu.data.writer import IndexedDatasetsWriter, token_dtype
    import numpy as np

    base = args.output_prefix + handler.prefix_suffix
    out_dir = os.path.dirname(os.path.abspath(base))
    os.makedirs(out_dir, exist_ok=True)
    tokens = handler.token_dtype or token_dtype(vocab_size(tokenizer))
    prefixes = {name: (f"{base}_{name}", tokens) for name in handler.outputs}
    print(f"{PROG}: {len(files)} input file(s), {args.handler_name}"
          f"{' (' + spec.prompt_type + ' template)' if args.handler_name != PRETRAIN else ''}, "
          f"{args.workers} worker(s){inert_note(args)}", file=sys.stderr, flush=True)
    progress = Progress(args.log_interval)
    with IndexedDatasetsWriter(prefixes, base) as writer:
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
