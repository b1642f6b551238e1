"""Device layer: picks npu / cuda / cpu once and hands the model a megatron-core BackendSpecProvider.

Import what you need from the submodules (``aquila_npu.device.setup``, ``.backends``); this package imports
nothing on its own so that ``import aquila_npu`` stays free of side effects.
"""

DEVICES = ("npu", "cuda", "cpu")  # what --device takes besides "auto"; here so parsers need not import torch
DIST_BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}
