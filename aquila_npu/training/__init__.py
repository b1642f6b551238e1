"""Pretraining / SFT on megatron-core: the resolved run (``config``), data batches, the step, checkpoints, reports
and the loop (``run``). The flags: ``aquila_npu.cli.pretrain``."""
