"""The Ascend runtime settings a training job on an Atlas node wants from the first step, each with its source:
what ``device.setup("npu")`` applies before torch_npu is imported (environment variables the CANN runtime, HCCL and
torch_npu read) and right after (torch_npu's compile mode). Every one is the user's to override: a variable already
in the environment is left as it is (and named as the user's in the banner). No torch import.

``examples/aquila2/launch.sh`` exports the same values (``tests/test_npu_runtime_settings.py`` compares them), so a
script's run and a plain ``torchrun -m aquila_npu.pretrain`` get the same settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

JIT_ENV = "AQUILA_NPU_JIT_COMPILE"  # 1: torch_npu compiles operators at first use (jit_compile=True)


@dataclass(frozen=True)
class Setting:
    name: str  # the environment variable (or, for the compile mode, the variable that overrides it)
    default: Optional[str]  # None: not set unless the user sets it (then only reported)
    why: str
    source: str
    quotes: Tuple[str, ...] = ()  # what the source quotes from the torch_npu 2.13.0 wheel (a test finds each there)


SETTINGS: Tuple[Setting, ...] = (
    Setting("HCCL_CONNECT_TIMEOUT", "3600",
            "seconds HCCL waits for every rank at a communicator's first collective; CANN's default 120 s ends "
            "multi-node jobs whose ranks are still loading a checkpoint or compiling operators",
            "FlagPerf's Ascend Aquila2 recipe for FlagScale (FlagOpen/FlagPerf training/ascend/aquila2_7B_container-"
            "in_container/config.py: HCCL_CONNECT_TIMEOUT=3600); torch_npu 2.6.0 and 2.13.0 warn below 300 s ('It "
            "is recommended to set the timeout duration of HCCL_CONNECT_TIMEOUT to 300 seconds or more.')",
            ("It is recommended to set the timeout duration of HCCL_CONNECT_TIMEOUT to 300 seconds or more.",)),
    Setting("HCCL_EXEC_TIMEOUT", "1800",
            "seconds a collective may wait for its peers once started; 1800 is the 30 minutes of torch.distributed's "
            "own timeout (device/setup.init_distributed), so a hung rank ends the job with an error in both",
            "FlagPerf's recipe sets 0 (never time out: HCCL_EXEC_TIMEOUT=0 gives that); torch_npu 2.13.0 reads it "
            "('The value of HCCL_EXEC_TIMEOUT was set to 0(never timeout)')",
            ("The value of HCCL_EXEC_TIMEOUT was set to 0(never timeout)",)),
    Setting("HCCL_IF_BASE_PORT", None,
            "the first of the host ports HCCL listens on; two jobs on one node need different bases (e.g. 60000 "
            "and 61000), else the second fails to bind",
            "CANN's HCCL environment variables (not read by torch_npu itself; not set unless given)"),
    Setting("PYTORCH_NPU_ALLOC_CONF", "expandable_segments:True",
            "the caching allocator grows segments instead of splitting fixed ones: less fragmentation, fewer "
            "out-of-memory errors at high use",
            "ModelLink's Aquila2 scripts (1.0.RC2 examples/aquila2/pretrain_aquila2_7b_ptd.sh) and MindSpeed-LLM's "
            "recipes (examples/fsdp2/env_config.sh); torch_npu 2.13.0 reads it ('expandable_segments' in its "
            "allocator configuration)", ("expandable_segments: %d",)),
    Setting("CPU_AFFINITY_CONF", "1",
            "binds each process's threads to the CPU cores beside its NPU (mode 1: coarse binding by NPU)",
            "torch_npu 2.6.0 and 2.13.0 read it ('[PTA]:Get env var CPU_AFFINITY_CONF', options mode, npu_affine, "
            "bind_irq, lazy_bind); MindSpeed-LLM's examples/fsdp2/env_config.sh: CPU_AFFINITY_CONF=1",
            ("[PTA]:Get env var CPU_AFFINITY_CONF", "npu_affine:(\\d)", "bind_irq:(\\d)")),
    Setting(JIT_ENV, "0",
            "0: torch.npu.set_compile_mode(jit_compile=False), CANN's precompiled binary kernels; with 1 every new "
            "operator shape is compiled at first use and the first step takes minutes",
            "ModelLink 1.0.RC2 modellink/arguments.py (--jit-compile, default off: 'Setting jit compile mode to "
            "True'); torch_npu 2.13.0 torch_npu/npu/npu_config.py:98 set_compile_mode(jit_compile=False)",
            ("def set_compile_mode(jit_compile=False):",)),
)

BY_NAME: Dict[str, Setting] = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Applied:
    name: str
    value: str
    yours: bool  # a value of the user's other than the default

    def describe(self) -> str:
        shown = f"jit_compile={'True' if self.value == '1' else 'False'}" if self.name == JIT_ENV else \
            f"{self.name}={self.value}"
        return shown + (" (yours)" if self.yours else "")


def plan(environ: Mapping[str, str] = os.environ) -> List[Applied]:
    """What ``apply`` sets: each setting's value (the user's where given) and whose it is."""
    out = []
    for s in SETTINGS:
        if s.name in environ:  # the user's (the example scripts export the defaults: those are not "yours")
            out.append(Applied(s.name, environ[s.name], environ[s.name] != s.default))
        elif s.default is not None:
            out.append(Applied(s.name, s.default, False))
    return out


def check(environ: Mapping[str, str] = os.environ) -> None:
    """A value torch_npu or HCCL would refuse or misread, named in one line (``UsageError``)."""
    from aquila_npu.errors import UsageError

    for name in ("HCCL_CONNECT_TIMEOUT", "HCCL_EXEC_TIMEOUT", "HCCL_IF_BASE_PORT"):
        value = environ.get(name)
        if value is not None and not value.strip().isdigit():
            raise UsageError(f"{name}={value!r}: HCCL expects a whole number")
    if environ.get(JIT_ENV, "0") not in ("0", "1"):
        raise UsageError(f"{JIT_ENV}={environ[JIT_ENV]!r}: 0 (binary kernels, the default) or 1 (compile at first use)")


def jit_compile(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get(JIT_ENV, "0") == "1"


def describe(applied: List[Applied]) -> str:
    """One banner line: ``NPU runtime: HCCL_CONNECT_TIMEOUT=3600, ... (aquila_npu.device.npu_runtime)``."""
    return "NPU runtime: " + ", ".join(a.describe() for a in applied) + " (sources: aquila_npu/device/npu_runtime.py)"
