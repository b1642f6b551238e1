"""Aquila2 model definitions: the registry of named architectures and the megatron-core GPTModel builder."""
