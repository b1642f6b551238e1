"""Hugging Face <-> megatron-core weight mapping, tensor/pipeline splitting and merging."""
