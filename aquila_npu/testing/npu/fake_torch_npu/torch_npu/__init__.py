"""Loader for the fake torch_npu (tests only; see aquila_npu.testing.npu.runtime)."""
import sys

from aquila_npu.testing.npu import runtime

runtime.install_runtime(sys.modules[__name__])
