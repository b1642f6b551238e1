"""Training datasets over ``tools/preprocess_data.py`` output, built by megatron-core's BlendedMegatronDatasetBuilder.

Pretraining: ``build_pretrain_datasets`` gives megatron-core ``GPTDataset`` (or ``BlendedDataset``) train / valid /
test splits from ``--data-path`` (``"w1 p1 w2 p2"`` weights allowed) and ``--split``.

Instruction tuning: ``build_instruction_datasets`` gives ``InstructionDataset`` splits over the three
``<prefix>_packed_*_document`` files (``--data-path <prefix>`` as ModelLink users pass it), same blending and splits.

Every sample (both kinds) is a dict of tensors of length ``seq_length`` (megatron-core's GPT batch format):

    tokens        int64  input token ids
    labels        int64  next-token targets (tokens shifted by one); ignored positions hold a valid id (pad), not -100
    loss_mask     float  1.0 where the target counts; 0.0 on the prompt, on padding and on -100 labels
    position_ids  int64  0 .. seq_length-1 (restarting at each document of a packed sequence)
    attention_mask bool  [1, s, s], True = masked (only with create_attention_mask=True)
    document_ids  int32  only for sequences of several documents: a number per token, changing where a document
                         starts (packed instruction samples; pretraining documents split at EOD with
                         ``reset_attention_mask``); ``aquila_npu.training.packing`` keeps attention within each

Works in one process without ``torch.distributed`` and under torchrun (megatron-core builds on rank 0 first, then on
the other ranks from its index cache, with barriers).
"""

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (BlendedMegatronDatasetConfig,
                                                                     parse_and_normalize_split)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.megatron_dataset import MegatronDataset

from aquila_npu.compat.megatron_core import DatasetConfigKeys, build_datasets
from aquila_npu.errors import DataError
from aquila_npu.data.handlers import IGNORE_INDEX
from aquila_npu.data.packing import epoch_packs
from aquila_npu.data.paths import check_prefix, indexed_prefixes, instruction_prefix, parse_data_path  # noqa: F401
from aquila_npu.data.tokenizer import MCoreTokenizer


def _split_sizes(train_valid_test_num_samples, weights, split):
    sizes = list(train_valid_test_num_samples) if train_valid_test_num_samples is not None else [None] * 3
    if len(sizes) != 3:
        raise ValueError("train_valid_test_num_samples needs three entries (None = one epoch)")
    if weights is not None:  # megatron-core needs a size for every split of a weighted blend, 0 for an empty one
        ratios = parse_and_normalize_split(split)
        for i, (size, ratio) in enumerate(zip(sizes, ratios)):
            if size is None and ratio == 0:
                sizes[i] = 0
            elif size is None:
                name = ("train", "valid", "test")[i]
                raise DataError(f"--data-path with weights needs a sample count for the {name} split "
                                "(train_valid_test_num_samples), as in Megatron")
    return sizes


def _build(cls, config, sizes, is_built_on_rank):
    if is_built_on_rank is None:
        is_built_on_rank = _always
    return build_datasets(BlendedMegatronDatasetBuilder(cls, sizes, is_built_on_rank, config))


def _always():
    return True


def as_mcore_tokenizer(tokenizer):
    """An ``MCoreTokenizer`` from one, from a Hugging Face tokenizer, or from a tokenizer directory."""
    if isinstance(tokenizer, MCoreTokenizer):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        return MCoreTokenizer.from_pretrained(str(tokenizer))
    return MCoreTokenizer(tokenizer)


def build_pretrain_datasets(data_path, split, seq_length, seed, tokenizer, train_valid_test_num_samples=None, *,
                            data_cache_path=None, reset_position_ids=False, reset_attention_mask=False,
                            eod_mask_loss=False, create_attention_mask=False, mmap_bin_files=True,
                            is_built_on_rank=None):
    """(train, valid, test) megatron-core ``GPTDataset`` / ``BlendedDataset`` splits (None where ``split`` gives 0).

    ``data_path``: ``--data-path`` (``"p"``, ``"p1 p2"`` or ``"w1 p1 w2 p2"``, string or list), prefixes of
    ``<prefix>.bin/.idx`` such as ``./dataset/Aquila2-7B/alpaca_text_document``. ``split``: ``"969,30,1"`` style.
    ``tokenizer``: an ``MCoreTokenizer``, a Hugging Face tokenizer, or its directory (gives eod / pad / vocab size).
    ``train_valid_test_num_samples``: samples to draw per split (None entries: one epoch; required with weights).
    ``is_built_on_rank``: megatron-core's callable (default: build on every rank). ``data_cache_path``: where the
    index cache goes (default: megatron-core's, ``<prefix>/cache/GPTDataset_indices``).
    """
    prefixes, weights = parse_data_path(data_path)
    for prefix in prefixes:
        check_prefix(prefix)
    tokenizer = as_mcore_tokenizer(tokenizer)
    # reset_attention_mask: documents as document_ids (the attention stays within each through megatron-core's packed
    # sequences), never megatron-core's [s, s] mask
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights), split=split,
        path_to_cache=data_cache_path, mmap_bin_files=mmap_bin_files, tokenizer=tokenizer,
        reset_position_ids=reset_position_ids, reset_attention_mask=False,
        eod_mask_loss=eod_mask_loss, create_attention_mask=create_attention_mask and not reset_attention_mask)
    sizes = _split_sizes(train_valid_test_num_samples, weights, split)
    splits = _build(GPTDataset, config, sizes, is_built_on_rank)
    if not reset_attention_mask:
        return splits
    return tuple(None if d is None else DocumentsAtEod(d, tokenizer.eod) for d in splits)


class DocumentsAtEod:
    """GPT samples with the ``document_ids`` of the documents in them: a document ends with its EOD token (the EOD
    belongs to the document before it, as in Megatron-LM's --reset-attention-mask)."""

    def __init__(self, dataset, eod: int):
        self.dataset, self.eod = dataset, eod

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx):
        sample = dict(self.dataset[idx])
        tokens = sample["tokens"]
        ends = (tokens == self.eod).to(torch.int32)
        sample["document_ids"] = torch.cumsum(ends, 0, dtype=torch.int32) - ends  # EODs before each token
        return sample


class PackedInstructionData:
    """The low-level dataset: one instruction sample per document of ``<base>_input_ids_document`` and
    ``<base>_labels_document`` (megatron-core ``IndexedDataset``s, checked to hold equal lengths)."""

    def __init__(self, base, mmap=True):
        for key in ("input_ids", "labels"):
            check_prefix(f"{base}_{key}_document")
        self.base = base
        self.input_ids = IndexedDataset(f"{base}_input_ids_document", mmap=mmap)
        self.labels = IndexedDataset(f"{base}_labels_document", mmap=mmap)
        if not np.array_equal(self.input_ids.sequence_lengths, self.labels.sequence_lengths):
            raise DataError(f"{base}: input_ids and labels documents differ in number or length")

    def __len__(self):
        return len(self.input_ids)

    def get(self, i):
        return self.input_ids[i], self.labels[i]


def instruction_positions(lengths, seq_length):
    """The sequence positions each instruction document takes: its ids but the last (inputs predict the next id),
    at most ``seq_length`` (longer ones are truncated)."""
    return np.minimum(np.maximum(np.asarray(lengths, dtype=np.int64) - 1, 0), seq_length)


def instruction_sample(input_ids, labels, seq_length, pad_id=0, create_attention_mask=False):
    """One training sample (dict of tensors, see the module doc) from a document's input ids and its labels (-100 on
    the prompt): tokens = input_ids[:-1], targets = labels[1:], truncated or padded to ``seq_length``."""
    sample = packed_sample([(input_ids, labels)], seq_length, pad_id)
    del sample["document_ids"]
    sample["position_ids"] = torch.arange(seq_length, dtype=torch.int64)
    if create_attention_mask:
        sample["attention_mask"] = torch.ones(seq_length, seq_length, dtype=torch.bool).triu(1).unsqueeze(0)
    return sample


def packed_sample(documents, seq_length, pad_id=0):
    """One training sample holding whole instruction ``documents`` ((input ids, labels) pairs) one after the other,
    each shifted on its own (tokens = ids[:-1], targets = labels[1:]: a document's inputs never predict the next
    document's ids), truncated at ``seq_length``, padded after the last; ``document_ids`` numbers them 1, 2, ... and
    the padding 0, ``position_ids`` restart at each."""
    tokens = np.full(seq_length, pad_id, dtype=np.int64)
    targets = np.full(seq_length, pad_id, dtype=np.int64)
    loss_mask = np.zeros(seq_length, dtype=np.float32)
    positions = np.zeros(seq_length, dtype=np.int64)
    document_ids = np.zeros(seq_length, dtype=np.int32)
    at = 0
    for number, (input_ids, labels) in enumerate(documents, 1):
        ids = np.asarray(input_ids, dtype=np.int64)[:-1][:seq_length - at]
        tgt = np.asarray(labels, dtype=np.int64)[1:][:len(ids)]
        n, end = len(ids), at + len(ids)
        tokens[at:end] = ids
        keep = tgt != IGNORE_INDEX
        targets[at:end] = np.where(keep, tgt, pad_id)
        loss_mask[at:end] = keep
        positions[at:end] = np.arange(n)
        document_ids[at:end] = number
        at = end
    positions[at:] = np.arange(seq_length - at)
    return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(targets),
            "loss_mask": torch.from_numpy(loss_mask), "position_ids": torch.from_numpy(positions),
            "document_ids": torch.from_numpy(document_ids)}


@dataclass
class InstructionDatasetConfig(BlendedMegatronDatasetConfig):
    """megatron-core's dataset config plus the pad id, whether samples carry an attention mask, and whether samples
    are packed several to a sequence (``aquila_npu.data.packing``)."""
    pad_id: int = 0
    create_attention_mask: bool = False
    pack: bool = False


class InstructionDataset(DatasetConfigKeys, MegatronDataset):
    """Instruction samples (``instruction_sample``) in a seeded random order, repeated over epochs up to
    ``num_samples`` (one epoch when None). With ``config.pack`` an item is a sequence of several whole samples
    (``packed_sample``): each epoch's shuffled samples are packed (``data.packing.epoch_packs``) and ``num_samples``
    counts sequences. Built by megatron-core's ``BlendedMegatronDatasetBuilder``."""

    # they change the samples, so they name the cache
    EXTRA_CONFIG_KEYS = ("pad_id", "create_attention_mask", "pack")

    def __init__(self, dataset, dataset_path, indices, num_samples, index_split, config):
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)
        n = len(indices) if num_samples is None else num_samples
        if n and not len(indices):
            raise DataError(f"{dataset_path}: the {index_split.name} split holds no documents")
        rng = np.random.RandomState(config.random_seed + index_split.value)
        lengths = self.dataset.input_ids.sequence_lengths
        self.truncated = int((lengths[indices] - 1 > config.sequence_length).sum()) if len(indices) else 0
        if config.pack:
            self.packs = []
            positions = instruction_positions(lengths, config.sequence_length)
            while len(self.packs) < (n if num_samples is not None else 1) and len(indices):
                epoch = rng.permutation(indices)
                self.packs += epoch_packs(epoch, positions[epoch], config.sequence_length, rng)
                if num_samples is None:
                    break
            del self.packs[n if num_samples is not None else len(self.packs):]
            self.order = None
            self.samples = sum(len(p) for p in self.packs)
            self.fill = (sum(int(positions[p].sum()) for p in self.packs) / (len(self.packs) * config.sequence_length)
                         if self.packs else 0.0)
            return
        epochs = math.ceil(n / len(indices)) if len(indices) else 0
        order = [rng.permutation(indices) for _ in range(epochs)]
        self.order = np.concatenate(order)[:n] if order else np.zeros(0, dtype=np.int64)

    @staticmethod
    def numel_low_level_dataset(low_level_dataset):
        return len(low_level_dataset)

    @staticmethod
    def build_low_level_dataset(dataset_path, config):
        return PackedInstructionData(instruction_prefix(dataset_path), mmap=config.mmap_bin_files)

    def __len__(self):
        return len(self.packs) if self.config.pack else len(self.order)

    def __getitem__(self, idx):
        if self.config.pack:
            return packed_sample([self.dataset.get(int(i)) for i in self.packs[idx]], self.config.sequence_length,
                                 self.config.pad_id)
        ids, labels = self.dataset.get(int(self.order[idx]))
        return instruction_sample(ids, labels, self.config.sequence_length, self.config.pad_id,
                                  self.config.create_attention_mask)


def build_instruction_datasets(data_path, split, seq_length, seed, train_valid_test_num_samples=None, *,
                               tokenizer=None, pad_id=None, data_cache_path=None, create_attention_mask=False,
                               pack=False, mmap_bin_files=True, is_built_on_rank=None):
    """(train, valid, test) ``InstructionDataset`` splits (or megatron-core ``BlendedDataset``s over them; None where
    ``split`` gives 0) from ``--data-path`` prefixes as ModelLink users pass them (``./finetune_dataset/alpaca``).

    Documents are split by ``split`` in file order, then each split is shuffled with ``seed``. ``pad_id``: the id
    put in padded positions (default: the tokenizer's pad when given, else 0; its loss is masked either way).
    ``data_cache_path``: where megatron-core caches the blend indices of a multi-prefix ``data_path`` (default: none).
    ``pack``: several whole samples per sequence (``InstructionDataset``); the sample counts are then sequences.
    """
    prefixes, weights = parse_data_path(data_path)
    for prefix in prefixes:
        instruction_prefix(prefix)
    if pad_id is None:
        pad_id = as_mcore_tokenizer(tokenizer).hf_pad if tokenizer is not None else None
    config = InstructionDatasetConfig(random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights),
                                      split=split, path_to_cache=data_cache_path, mmap_bin_files=mmap_bin_files,
                                      pad_id=pad_id if pad_id is not None and pad_id >= 0 else 0,
                                      create_attention_mask=create_attention_mask, pack=pack)
    sizes = _split_sizes(train_valid_test_num_samples, weights, split)
    return _build(InstructionDataset, config, sizes, is_built_on_rank)

