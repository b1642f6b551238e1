"""Facts of torch_npu's kernels that our NPU modules and the tests' emulator of those kernels share (doc lines:
torch_npu 2.13.0's ``torch_npu/_op_plugin_docs.py``). Importing this module imports nothing."""

COMPRESSED_MASK = 2048  # the side of the compressed causal mask of sparse modes 2 and 3 (docs 1643-1644, 8214)
