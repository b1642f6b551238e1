"""Loader for the fake torch_npu (tests only; see aquila_npu.testing.npu_emulator)."""
import sys

from aquila_npu.testing import npu_emulator

npu_emulator.install_runtime(sys.modules[__name__])
