"""Loader for the fake transfer_to_npu (tests only; see aquila_npu.testing.npu.transfer_to_npu)."""
import torch_npu  # noqa: F401  (as the real module: the runtime first)

from aquila_npu.testing.npu.transfer_to_npu import transfer_to_npu

transfer_to_npu()
