"""What a command does when it takes several libraries together: each ``aquila_npu.cli`` module parses its flags and
makes one call, into a library or into one of these.

    pretrain   training.run with the model transforms the flags ask for (LoRA)
    convert    HF <-> Megatron checkpoints (checkpoint.convert) and LoRA adapters (lora.convert, merges)
    selfcheck  the logits check against Hugging Face (checks.logits) or the first-hour report (checks.report)
    demo       the whole job on a CPU, as subprocesses of the real commands
"""
