"""Pretraining / SFT on megatron-core: flags, architecture resolution, data batches, step, checkpoints, reports."""
