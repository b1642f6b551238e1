"""Aquila2 model definitions: the registry of named architectures (``registry``), Hugging Face configs
(``hf_config``), the architecture flags users pass (``arch_flags``), dtype names (``dtypes``), and the one
megatron-core model (``config``: TransformerConfig, ``gpt``: GPTModel from a device backend's modules)."""
