"""The boundary to the outside world: every place where aquila_npu replaces, wraps or calls a private part of another
library lives in this package, one module per library, each replacement written down as a ``Replacement`` record.

    compat.torch          torch and torch_npu: device-call redirection (cpu, npu, the fake npu), host events and
                          streams, oneDNN's linear op, HCCL communicator names, megatron-core's deferred compile
    compat.megatron_core  megatron-core: RNG-state helpers, objects bound at import on the NPU, the gradient norm, the
                          optimizer class, the fused-RoPE slot, the linears' product seam, the rotated KV cache, the
                          dataset builder without a process group, the distributed optimizer's state loading
    compat.peft           peft: its megatron-core LoRA layer, fixed, and its custom-module registration
    compat.versions       the versions all of this was read from, checked at start-up (one line, exit status 2)
    compat.journal        what was changed at run time, so that ``undo_all()`` restores it

Nothing here runs on import. ``records()`` lists every record; tests/test_compat.py checks that each target still
exists with the signature it was written for (an upgrade of megatron-core, peft or torch fails there, in one place),
and that no module outside this package (and the tests' fake torch_npu runtime, which imitates torch_npu) patches
another library or uses a private name of one.
"""

from __future__ import annotations

from typing import Tuple

from aquila_npu.compat.record import Replacement

MODULES = ("aquila_npu.compat.torch", "aquila_npu.compat.megatron_core", "aquila_npu.compat.peft")


def records() -> Tuple[Replacement, ...]:
    """Every record of every compat module (imports torch, and peft with transformers: for tests and reports)."""
    import importlib

    return tuple(r for name in MODULES for r in importlib.import_module(name).RECORDS)
