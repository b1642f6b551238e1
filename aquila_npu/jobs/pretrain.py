"""``aquila_npu.pretrain``: a training run (``aquila_npu.training.run``) with the model transforms its flags ask for
(LoRA: ``--lora-target-modules`` / ``--lora-load``), their inputs checked before the run's."""

from __future__ import annotations


def run(args) -> int:
    from aquila_npu.training.inputs import check_paths

    check_paths(args)  # before torch and megatron-core are imported
    from aquila_npu.lora import training as lora_training
    from aquila_npu.training.run import run as train

    return train(args, lora_training.transform(args))
