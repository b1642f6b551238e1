"""``python -m aquila_npu.generate``'s library call: prompts in, text out (``aquila_npu.inference.generation``).

Rank 0 prints the text as it is generated (token by token with one prompt per batch; each prompt's text at the end
of its batch otherwise). ``--output`` writes one JSON line per prompt, in input order: ``prompt``, ``text``,
``token_ids`` (the generated ids, without the EOS that ended them) and ``finish_reason`` ("eos" or "length").
With more processes than tensor x pipeline parallel ranks, the data-parallel replicas share the prompts.

torch, megatron-core and transformers are imported once the flags and prompts are checked (input errors take a
fraction of a second).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List

from aquila_npu.data.sources import iter_json_objects
from aquila_npu.errors import DataError, UsageError
from aquila_npu.flags import inert_note
from aquila_npu.inference.chat import chat_prompt, default_template
from aquila_npu.inference.options import model_options
from aquila_npu.outputs.files import atomic_file
from aquila_npu.ranks import print0

PROG = "python -m aquila_npu.generate"


def read_prompts(args: argparse.Namespace) -> List[str]:
    if args.prompt:
        return list(args.prompt)
    path = args.prompts_file
    prompts = []
    if path.endswith(".jsonl"):
        try:
            for where, row in iter_json_objects(path):
                if isinstance(row, str):
                    prompts.append(row)
                elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
                    prompts.append(row["prompt"])
                else:
                    raise DataError(f"{where}: expected a string or an object with a string 'prompt'")
        except FileNotFoundError:
            raise DataError(f"--prompts-file {path}: no such file") from None
        except OSError as e:
            raise DataError(f"--prompts-file {path}: {e.strerror or e}") from None
    else:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise DataError(f"--prompts-file {path}: {e.strerror or e}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise DataError(f"--prompts-file {path}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); "
                            "save it as UTF-8") from None
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"--prompts-file {path}: no prompts")
    return prompts


def sampling_params(args: argparse.Namespace):
    """The ``SamplingParams`` of the flags (imports torch: call it after the other input checks)."""
    sampling_flags = [f for f, v in (("--temperature", args.temperature), ("--top-k", args.top_k),
                                     ("--top-p", args.top_p)) if v is not None]
    if args.greedy and sampling_flags:
        raise UsageError(f"--greedy cannot be combined with {', '.join(sampling_flags)}")
    from aquila_npu.inference.options import SamplingParams

    try:
        if not sampling_flags:
            return SamplingParams(greedy=True, seed=args.seed)
        return SamplingParams(greedy=False, temperature=1.0 if args.temperature is None else args.temperature,
                              top_k=args.top_k or 0, top_p=1.0 if args.top_p is None else args.top_p, seed=args.seed)
    except ValueError as e:
        raise UsageError(str(e)) from None


class ConsoleStream:
    """Rank 0's console: live text for a one-prompt batch, whole texts at the end of larger batches."""

    def __init__(self, tokenizer, enabled: bool):
        self.tokenizer = tokenizer
        self.enabled = enabled
        self.ids: List[int] = []
        self.printed = ""

    def begin(self, label: str, prompt: str) -> None:
        self.ids, self.printed = [], ""
        if self.enabled:
            sys.stdout.write(f"\n===== {label} =====\n{prompt}\n----- generated -----\n")
            sys.stdout.flush()

    def on_token(self, row: int, token: int) -> None:
        if not self.enabled:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next byte(s)
            return
        sys.stdout.write(text[len(self.printed):] if text.startswith(self.printed) else "\n" + text)
        sys.stdout.flush()
        self.printed = text

    def write(self, text: str) -> None:
        if self.enabled:
            sys.stdout.write(text)

    def end(self) -> None:
        if self.enabled:
            sys.stdout.write("\n")
            sys.stdout.flush()


def generate(args: argparse.Namespace) -> int:
    """Generate as the parsed flags say (``aquila_npu.cli.generate``): prompts and options checked first, torch and
    megatron-core imported only then."""
    prompts = read_prompts(args)
    options = model_options(args)
    sampling = sampling_params(args)
    from aquila_npu.compat.torch import import_megatron_core

    import_megatron_core()  # before anything else imports it: its torch.compile decorations wait for first use
    from aquila_npu.inference.generation import TextGenerator
    from aquila_npu.inference.session import Session, gather, shard

    session = Session.start(options)
    tok, loaded = session.tokenizer, session.loaded
    template = (args.chat_template or default_template(loaded.spec)) if args.chat else None
    texts = [chat_prompt(template, p, system=args.system_prompt) if template else p for p in prompts]
    encoded = [tok.encode(t) for t in texts]
    generator = TextGenerator.from_loaded(loaded, session.device.torch_device, max_sequence_length=session.max_length)
    stop = args.eos_token_id if args.eos_token_id is not None else session.eos_id()
    batch = args.micro_batch_size or 1
    mine = [i for i, _ in shard(prompts)]
    stream = ConsoleStream(tok, enabled=session.is_rank0)
    print0(f"{PROG}: {len(prompts)} prompt(s), {session.describe()} ({session.device.backend.describe()})"
           + (f", chat template {template}" if template else "") + inert_note(args))
    results = {}
    for b0 in range(0, len(mine), batch):
        idx = mine[b0:b0 + batch]
        live = len(idx) == 1
        if live:
            stream.begin(f"prompt {idx[0] + 1}/{len(prompts)}", texts[idx[0]])
        out = generator.generate([encoded[i] for i in idx], args.max_new_tokens, sampling, eos_id=stop,
                                 pad_id=session.pad_id(), use_kv_cache=not args.no_kv_cache,
                                 on_token=stream.on_token if live else None)
        for i, g in zip(idx, out):
            text = tok.decode(g.token_ids, skip_special_tokens=True)
            results[i] = {"prompt": prompts[i], "text": text, "token_ids": g.token_ids,
                          "finish_reason": g.finish_reason}
            if not live:
                stream.begin(f"prompt {i + 1}/{len(prompts)}", texts[i])
                stream.write(text)
            stream.end()
    results = gather(results)
    if args.output and session.is_rank0:
        with atomic_file(args.output, "the generations") as f:
            for i in range(len(prompts)):
                f.write(json.dumps(results[i], ensure_ascii=False) + "\n")
        print0(f"{PROG}: wrote {len(prompts)} line(s) to {args.output}")
    return 0
