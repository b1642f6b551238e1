"""Test helpers shipped with the package (the torch_npu emulator, tiny HF models)."""
