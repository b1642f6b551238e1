"""Running a loaded model: ``session`` (checkpoint checked once, device, this rank's stage, data-parallel sharing),
``forward`` (pipeline-parallel forward passes), ``generation`` (KV-cache decoding with megatron-core's static
inference context), ``sampling`` (greedy / temperature / top-k / top-p), ``chat`` (AquilaChat2 prompts).
Evaluation (``aquila_npu.evaluation``) scores through the same session and forward pass."""
