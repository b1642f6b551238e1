"""The Hugging Face tokenizer of a model (``--tokenizer-name-or-path``), with clear errors."""

from __future__ import annotations

import os


class TokenizerError(ValueError):
    """The tokenizer cannot be loaded or does not fit the model."""


def load_tokenizer(path: str, use_fast: bool = True):
    """``AutoTokenizer`` from a local folder (``tokenizer.json`` / ``vocab.json`` + ``merges.txt`` / ...)."""
    if not path or not os.path.isdir(path):
        raise TokenizerError(f"--tokenizer-name-or-path {path}: no such directory (give the Hugging Face model folder "
                             "holding the tokenizer files, e.g. ./model_from_hf/Aquila2-7B/)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, use_fast=use_fast, trust_remote_code=False)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for unusable folders
        raise TokenizerError(f"--tokenizer-name-or-path {path}: cannot load a tokenizer ({type(e).__name__}: {e})") \
            from None


def check_tokenizer_fits(tokenizer, vocab_size: int, path: str = "") -> None:
    """Every id the tokenizer can produce must be a row of the model's embedding."""
    n = len(tokenizer)
    if n > vocab_size:
        raise TokenizerError(f"tokenizer {path} has {n} tokens but the checkpoint's vocabulary has {vocab_size}: "
                             "it is the tokenizer of another model")


def eos_id(tokenizer, spec) -> int:
    """The tokenizer's end-of-sequence id, else the model's."""
    tid = getattr(tokenizer, "eos_token_id", None)
    return spec.eos_token_id if tid is None else int(tid)


def pad_id(tokenizer) -> int:
    tid = getattr(tokenizer, "pad_token_id", None)
    if tid is None:
        tid = getattr(tokenizer, "eos_token_id", None)
    return 0 if tid is None else int(tid)
