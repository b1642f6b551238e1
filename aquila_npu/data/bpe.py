"""Small byte-level BPE tokenizers trained on the fly with the ``tokenizers`` library (no hub access needed), saved
as Hugging Face tokenizer folders. Used by tests and by the CPU demo."""

from __future__ import annotations

import os
from typing import Iterable, Sequence

# Aquila2-like special tokens: pad / unk, bos, eos, and the chat-template pieces.
SPECIALS = ("<|endoftext|>", "[CLS]", "</s>", "<|startofpiece|>", "<|endofpiece|>")


def train_tokenizer(path: str, corpus: Iterable[str], vocab_size: int, specials: Sequence[str] = SPECIALS,
                    exact_size: bool = False) -> str:
    """Train a byte-level BPE on ``corpus`` and save it (tokenizer.json + config) into ``path``; returns ``path``.

    Ids: pad/unk ``<|endoftext|>`` 0, bos ``[CLS]`` 1, eos ``</s>`` 2, then the other specials. With ``exact_size``
    the vocabulary must come out at exactly ``vocab_size`` (give a corpus large enough).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    if exact_size and bpe.get_vocab_size() != vocab_size:
        raise ValueError(f"tokenizer came out at {bpe.get_vocab_size()} tokens, not {vocab_size}: corpus too small")
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=specials[0], unk_token=specials[0],
                                  bos_token=specials[1], eos_token=specials[2],
                                  additional_special_tokens=list(specials[3:]))
    os.makedirs(path, exist_ok=True)
    tok.save_pretrained(path)
    return path
