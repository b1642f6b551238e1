"""Training throughput benchmark behind ``python -m aquila_npu.benchmark``: ``run`` measures (through the training
entry point, in a subprocess), ``environment`` records the device and software, ``compare`` prints saved results side
by side, ``plot`` draws them. Usage and the FLOP formula: docs/benchmark.md."""
