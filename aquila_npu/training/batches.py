"""Micro-batches for one data-parallel rank, resumable from a count of consumed samples (as Megatron-LM's
pretraining sampler: each global batch is taken in order, rank r of the data-parallel group takes its slice)."""

from __future__ import annotations

from typing import Iterator, Optional

import torch


class MockDataset:
    """Random tokens, the same for the same index and seed (benchmarks and smoke tests: ``--mock-data``)."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int):
        self.n, self.s, self.v, self.seed = num_samples, seq_length, vocab_size, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        seq = torch.randint(0, self.v, (self.s + 1,), generator=g)
        return {"tokens": seq[:-1], "labels": seq[1:], "loss_mask": torch.ones(self.s),
                "position_ids": torch.arange(self.s)}


def micro_batches(dataset, *, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int
                  ) -> Iterator[dict]:
    """Endless (until the dataset runs out) collated micro-batches ``{key: [micro_batch_size, s]}``."""
    step = micro_batch_size * dp_size
    start = consumed_samples
    while start + step <= len(dataset):
        first = start + dp_rank * micro_batch_size
        samples = [dataset[i] for i in range(first, first + micro_batch_size)]
        yield {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
        start += step


def cycle_for_eval(dataset, micro_batch_size: int, dp_rank: int, dp_size: int) -> Optional[Iterator[dict]]:
    """Validation batches, restarting from the beginning when exhausted."""
    if dataset is None or len(dataset) < micro_batch_size * dp_size:
        return None

    def gen():
        while True:
            yield from micro_batches(dataset, consumed_samples=0, micro_batch_size=micro_batch_size,
                                     dp_rank=dp_rank, dp_size=dp_size)
    return gen()
