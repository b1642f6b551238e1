"""The layout planner: the memory of a training layout per device, derived from the model's shapes and
megatron-core's schedule (``memory``), the devices' memory and links (``devices``), the layouts that fit ranked by a
throughput estimate (``layouts``). ``python -m aquila_npu.plan`` prints them; ``aquila_npu.pretrain`` prints the
estimate of its own layout at start.

Nothing here imports torch at module level but ``memory`` (the per-rank parameter shapes come from the weight
mapping's own split, on the meta device).
"""
