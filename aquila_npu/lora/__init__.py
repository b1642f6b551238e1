"""LoRA fine-tuning on the megatron-core model (HF PEFT's megatron-core layers), adapter checkpoints, and
conversions to and from Hugging Face PEFT adapters and merged weights.

* ``settings``: MindSpeed-LLM's flags (--lora-r, --lora-alpha, --lora-dropout, --lora-target-modules, --lora-load);
* ``layers``: adapters injected into a GPTModel stage with peft (tensor parallelism follows the base layer);
* ``state``: base vs adapter tensors, parameter counts, optimizer-state bytes;
* ``checkpoint``: adapter checkpoints in the Megatron directory layout;
* ``training``: the calls a training run makes;
* ``convert``: merge into the base, export / import PEFT adapters.
"""
