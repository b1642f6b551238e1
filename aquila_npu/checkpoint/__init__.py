"""Checkpoints on disk: Hugging Face folders and Megatron checkpoint directories, read and written stage by stage."""
