"""Load the Hugging Face tokenizer named by ``--tokenizer-name-or-path``, and adapt it for megatron-core's datasets."""

import os
from collections import OrderedDict

from aquila_npu.errors import DataError

TOKENIZER_TYPES = ("PretrainedFromHF",)


def check_tokenizer_path(name_or_path, tokenizer_type="PretrainedFromHF") -> bool:
    """What can be said of ``--tokenizer-name-or-path`` without transformers (a ``DataError`` naming the flag): a path
    that does not exist, or a file. Returns whether it is a local folder (else: a model name for the local HF cache)."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise DataError(f"--tokenizer-type {tokenizer_type!r} is not supported "
                        f"(choose from {', '.join(TOKENIZER_TYPES)})")
    if not name_or_path:
        raise DataError("--tokenizer-name-or-path is required")
    local = os.path.exists(name_or_path)
    if not local and (os.path.isabs(name_or_path) or name_or_path.startswith((".", "~"))):
        raise DataError(f"--tokenizer-name-or-path: {name_or_path} does not exist")
    if local and not os.path.isdir(name_or_path):
        raise DataError(f"--tokenizer-name-or-path: {name_or_path} is not a directory (give the folder that holds "
                        "tokenizer_config.json / tokenizer.json)")
    return local


# FlagAI's first-generation Aquila folders (Aquila-7B, AquilaChat-7B, AquilaCode-7B-*) hold FlagAI's 100k BPE
# (``gpt2_new_100k``) as vocab.json + merges.txt only, read by FlagAI's own tokenizer; the model's vocabulary ends with
# these eight tokens at ids 100000-100007, bos [CLS], eos </s>, pad = unk = <|endoftext|> (0): the tokenizer of Aquila2,
# whose Hugging Face files came from FlagAI's examples/Aquila/Aquila-tokenizer-hf.
AQUILA_ADDED_TOKENS = ("<|startofpiece|>", "<|endofpiece|>", "<|LDWANG|>", "[MASK]", "[gMASK]", "[sMASK]", "[CLS]",
                       "</s>")
AQUILA_ADDED_FROM = 100000


def is_bpe_only_folder(path) -> bool:
    """A folder with vocab.json + merges.txt and no Hugging Face tokenizer config (FlagAI's model folders, and the
    Hugging Face folder converted from one)."""
    def has(name):
        return os.path.isfile(os.path.join(path, name))

    return (os.path.isdir(path) and has("vocab.json") and has("merges.txt") and not has("tokenizer_config.json")
            and not has("tokenizer.json"))


def load_flagai_bpe(path):
    """FlagAI's Aquila BPE in ``path`` as transformers' byte-level BPE (``GPT2Tokenizer``: no remote code), with the
    Aquila added tokens; ``DataError`` when the vocabulary does not put them at 100000-100007."""
    from transformers import GPT2Tokenizer

    endoftext = "<|endoftext|>"
    tok = GPT2Tokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"), errors="replace",
                        unk_token=endoftext, bos_token=endoftext, eos_token=endoftext, pad_token=endoftext,
                        add_prefix_space=False)
    tok.add_special_tokens({"additional_special_tokens": list(AQUILA_ADDED_TOKENS)})
    tok.bos_token, tok.eos_token = "[CLS]", "</s>"
    ids = tok.convert_tokens_to_ids(list(AQUILA_ADDED_TOKENS))
    want = list(range(AQUILA_ADDED_FROM, AQUILA_ADDED_FROM + len(AQUILA_ADDED_TOKENS)))
    if ids != want or tok.convert_tokens_to_ids(endoftext) != 0:
        raise DataError(f"--tokenizer-name-or-path: {path} holds vocab.json + merges.txt without a Hugging Face "
                        f"tokenizer config, read as FlagAI's Aquila BPE, but its vocabulary puts "
                        f"{', '.join(AQUILA_ADDED_TOKENS)} at {ids}, not {want[0]}-{want[-1]}: add the tokenizer's "
                        "tokenizer_config.json")
    return tok


def load_tokenizer(name_or_path, use_fast=True, tokenizer_type="PretrainedFromHF"):
    """The ``transformers`` tokenizer in ``name_or_path`` (a local directory, or a model already in the local HF cache).

    ``use_fast=False`` is ``--tokenizer-not-use-fast``. Never goes to the network. Raises ``DataError`` naming the flag
    when the path does not exist or holds no loadable tokenizer. A folder with only vocab.json + merges.txt (FlagAI's
    first-generation Aquila) is FlagAI's Aquila BPE (``load_flagai_bpe``).
    """
    local = check_tokenizer_path(name_or_path, tokenizer_type)
    flagai = local and is_bpe_only_folder(name_or_path)
    from transformers import AutoTokenizer

    try:
        if flagai:
            return load_flagai_bpe(name_or_path)
        return AutoTokenizer.from_pretrained(name_or_path, use_fast=use_fast, local_files_only=True,
                                             trust_remote_code=False)
    except DataError:
        raise
    except Exception as err:  # transformers raises OSError, ValueError, KeyError ... depending on what is missing
        if not local:
            raise DataError(f"--tokenizer-name-or-path: {name_or_path} does not exist (and is not a model in the local "
                            "Hugging Face cache; this tool does not download)") from None
        raise DataError(f"--tokenizer-name-or-path: cannot load a tokenizer from {name_or_path}: "
                        f"{type(err).__name__}: {err}") from None


def eod_id(tokenizer):
    """The end-of-document id: the tokenizer's eos (as ModelLink and Megatron use it), or None when it has none."""
    return tokenizer.eos_token_id


def vocab_size(tokenizer):
    """The number of token ids, added tokens included (100008 for Aquila2; ``tokenizer.vocab_size`` says 100000)."""
    return len(tokenizer)


class MCoreTokenizer:
    """What megatron-core's ``GPTDataset`` / ``GPTDatasetConfig`` read from ``config.tokenizer``.

    ``eod`` (the document separator, the tokenizer's eos), ``vocab_size`` (added tokens included), ``pad`` and
    ``unique_identifiers`` (hashed into the dataset cache file names). ``pad`` is -1, megatron-core's own "no pad
    token" value: GPTDataset pads a short final sample with it, then gives those positions token id 0 and loss mask 0.
    Aquila2's real pad id (<|endoftext|> = 0, ``hf_pad``) is not used, since megatron-core would also drop the loss of
    every genuine 0 in the data (the text "<|endoftext|>" encodes to it).
    """

    def __init__(self, hf_tokenizer, path=None):
        self._tok = hf_tokenizer
        self.path = path if path is not None else getattr(hf_tokenizer, "name_or_path", None)
        self.vocab_size = vocab_size(hf_tokenizer)
        self.eod = eod_id(hf_tokenizer)
        if self.eod is None:
            raise DataError(f"tokenizer {self.path}: has no eos token, which megatron-core needs as end of document")
        self.eos = self.eod
        self.bos = hf_tokenizer.bos_token_id
        self.hf_pad = hf_tokenizer.pad_token_id
        self.pad = -1

    @classmethod
    def from_pretrained(cls, name_or_path, use_fast=True):
        return cls(load_tokenizer(name_or_path, use_fast=use_fast), path=name_or_path)

    @property
    def unique_identifiers(self):
        ids = OrderedDict()
        ids["class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        ids["tokenizer_path"] = str(self.path)
        ids["vocab_size"] = self.vocab_size
        ids["eod"] = self.eod
        return ids

    def tokenize(self, text):
        return self._tok(text)["input_ids"]

    def detokenize(self, ids):
        return self._tok.decode(ids)
