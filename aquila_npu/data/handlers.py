"""Turn rows into token arrays: pretraining documents, or instruction samples (input_ids, attention_mask, labels).

A handler is built once per worker process (``build_handler(spec)``) and encodes a chunk of rows at a time, returning
for each output dataset one flat int32 array and the per-document lengths (cheap to send between processes).
"""

from dataclasses import dataclass

import numpy as np

from aquila_npu.errors import DataError
from aquila_npu.data.sources import Columns
from aquila_npu.data.templates import TEMPLATES, parse_conversation
from aquila_npu.data.tokenizer import eod_id, load_tokenizer

IGNORE_INDEX = -100
PRETRAIN = "GeneralPretrainHandler"
INSTRUCTION = "GeneralInstructionHandler"
HANDLERS = (PRETRAIN, INSTRUCTION)
INSTRUCTION_KEYS = ("input_ids", "attention_mask", "labels")


@dataclass(frozen=True)
class HandlerSpec:
    """Everything a worker needs to rebuild the handler (picklable)."""
    handler_name: str
    tokenizer_name_or_path: str
    use_fast: bool = True
    json_keys: tuple = ("text",)
    append_eod: bool = False
    prompt_type: str = "alpaca"
    conversation_key: str = None


@dataclass
class Encoded:
    """One chunk's output: per output suffix a (flat int32 tokens, int64 lengths) pair, plus counts for progress."""
    arrays: dict
    docs: int
    bytes: int
    empty: int


def _pack(seqs):
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    flat = np.concatenate([np.asarray(s, dtype=np.int32) for s in seqs]) if seqs else np.zeros(0, np.int32)
    return flat, lengths


class PretrainHandler:
    """Each ``--json-keys`` column of a row is one document: ``tokenizer(text)["input_ids"]`` (+ eod with
    ``--append-eod``), written to ``<prefix>_<key>_document``. Empty texts produce no document (as in Megatron)."""

    prefix_suffix = ""
    token_dtype = None  # megatron-core's choice for the vocabulary size (uint16 or int32)

    def __init__(self, spec, tokenizer):
        self.tokenizer = tokenizer
        self.keys = tuple(spec.json_keys)
        self.eod = eod_id(tokenizer)
        self.append_eod = spec.append_eod
        if self.append_eod and self.eod is None:
            raise DataError("--append-eod: the tokenizer has no eos token to use as end of document")
        self.columns = Columns(self.keys, flag="--json-keys")
        self.outputs = tuple(f"{k}_document" for k in self.keys)

    def encode(self, rows):
        arrays, nbytes, empty = {}, 0, 0
        for i, key in enumerate(self.keys):
            texts = [row[i] for row in rows]
            nbytes += sum(len(t.encode("utf-8")) for t in texts)
            nonempty = [t for t in texts if t]
            empty += len(texts) - len(nonempty)
            ids = self.tokenizer(nonempty)["input_ids"] if nonempty else []
            if self.append_eod:
                for seq in ids:
                    seq.append(self.eod)
            arrays[self.outputs[i]] = _pack([s for s in ids if s])
        return Encoded(arrays, len(rows), nbytes, empty)


class InstructionHandler:
    """ModelLink's ``GeneralInstructionHandler``: rows with ``instruction`` / ``input`` (optional) / ``output``
    columns, or (``--conversation-key``) a column of multi-turn conversations, rendered with ``--prompt-type``.

    Writes ``<prefix>_packed_{input_ids,attention_mask,labels}_document``: labels are the input ids with every
    prompt token set to -100 (IGNORE_INDEX), attention_mask is all ones. Each template segment is tokenized on its own
    (no special tokens added), so the ignored span is exactly the prompt's tokens. ``--append-eod`` appends the eos
    token (trained) unless the sample already ends with it (the AquilaChat2 templates end answers with ``</s>``).
    """

    prefix_suffix = "_packed"
    token_dtype = np.int32  # labels hold -100

    def __init__(self, spec, tokenizer):
        if spec.prompt_type not in TEMPLATES:
            raise DataError(f"--prompt-type {spec.prompt_type!r}: choose from {', '.join(TEMPLATES)}")
        self.template = TEMPLATES[spec.prompt_type]
        self.tokenizer = tokenizer
        self.eod = eod_id(tokenizer)
        self.append_eod = spec.append_eod
        if self.append_eod and self.eod is None:
            raise DataError("--append-eod: the tokenizer has no eos token to use as end of document")
        self.bos = tokenizer.bos_token_id if getattr(tokenizer, "add_bos_token", False) else None
        self.conversation_key = spec.conversation_key
        if spec.conversation_key:
            self.columns = Columns([spec.conversation_key], kinds=[parse_conversation], flag="--conversation-key")
        else:
            self.columns = Columns(["instruction", "input", "output"], required=[True, False, True],
                                   flag="--handler-name GeneralInstructionHandler (alpaca columns)")
        self.outputs = tuple(f"{k}_document" for k in INSTRUCTION_KEYS)

    def samples(self, rows):
        """(list of [(text, trained)] segments per row, input bytes)."""
        out, nbytes = [], 0
        for row in rows:
            if self.conversation_key:
                system, turns = row[0]
            else:
                system, turns = None, [(self.template.user_text(row[0], row[1]), row[2])]
            nbytes += sum(len(q.encode("utf-8")) + len(a.encode("utf-8")) for q, a in turns)
            out.append(self.template.segments(turns, system))
        return out, nbytes

    def encode(self, rows):
        samples, nbytes = self.samples(rows)
        texts = [text for segs in samples for text, _ in segs]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        input_ids, labels, k = [], [], 0
        for segs in samples:
            inp, lab = ([self.bos], [IGNORE_INDEX]) if self.bos is not None else ([], [])
            for _, trained in segs:
                inp.extend(ids[k])
                lab.extend(ids[k] if trained else [IGNORE_INDEX] * len(ids[k]))
                k += 1
            if self.append_eod and (not inp or inp[-1] != self.eod):
                inp.append(self.eod)
                lab.append(self.eod)
            input_ids.append(inp)
            labels.append(lab)
        keep = [i for i, s in enumerate(input_ids) if s]
        input_ids = [input_ids[i] for i in keep]
        labels = [labels[i] for i in keep]
        flat, lengths = _pack(input_ids)
        arrays = {"input_ids_document": (flat, lengths),
                  "attention_mask_document": (np.ones_like(flat), lengths),
                  "labels_document": _pack(labels)}
        return Encoded(arrays, len(rows), nbytes, len(rows) - len(keep))


def build_handler(spec, tokenizer=None):
    """The handler ``spec`` describes; loads the tokenizer unless one is given."""
    if spec.handler_name not in HANDLERS:
        raise DataError(f"--handler-name {spec.handler_name!r}: choose from {', '.join(HANDLERS)}")
    if tokenizer is None:
        tokenizer = load_tokenizer(spec.tokenizer_name_or_path, use_fast=spec.use_fast)
    cls = PretrainHandler if spec.handler_name == PRETRAIN else InstructionHandler
    return cls(spec, tokenizer)
