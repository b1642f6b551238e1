"""The Ascend runtime settings (issue 27, part 2): each one applied by ``device.setup("npu")`` before torch_npu starts,
seen by the fake torch_npu runtime where the real one reads it (at import, at each HCCL communicator, the compile
mode), left to the user when given, named in the banner; the example scripts export the same values; what each
setting quotes from torch_npu is in the 2.13.0 wheel."""

import json
import re
import subprocess
import sys
import zipfile

import pytest

from aquila_npu.device import npu_runtime
from aquila_npu.errors import UsageError
from aquila_npu.testing.npu.runtime import RUNTIME_ENV

from helpers import ROOT, fake_npu_env, torch_npu_wheel

WORKER = """
import json
from aquila_npu.device.setup import setup
from aquila_npu.testing.npu import runtime
dev = setup("npu")
print(json.dumps({"settings": runtime.settings, "line": dev.runtime_line()}))
"""
NAMES = [s.name for s in npu_runtime.SETTINGS]
OVERRIDES = {"HCCL_CONNECT_TIMEOUT": "7200", "HCCL_EXEC_TIMEOUT": "0", "HCCL_IF_BASE_PORT": "61000",
             "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:False", "CPU_AFFINITY_CONF": "2",
             npu_runtime.JIT_ENV: "1"}


def _run(**env):
    full = fake_npu_env(AQUILA_FAKE_NPU_DEVICES=1, **env)
    for name in NAMES:
        if name not in env:
            full.pop(name, None)
    r = subprocess.run([sys.executable, "-c", WORKER], env=full, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs():
    return {"defaults": _run(), "yours": _run(**OVERRIDES)}


def test_every_setting_is_in_the_table_and_the_fake_runtime_reads_it():
    assert set(OVERRIDES) == set(NAMES)
    assert set(RUNTIME_ENV) == set(NAMES) - {npu_runtime.JIT_ENV}


@pytest.mark.parametrize("name", NAMES)
def test_setting_is_applied_seen_by_the_runtime_and_overridable(runs, name):
    setting = npu_runtime.BY_NAME[name]
    for case, expected in (("defaults", setting.default), ("yours", OVERRIDES[name])):
        seen = runs[case]["settings"]
        line = runs[case]["line"]
        if name == npu_runtime.JIT_ENV:
            assert seen["compile_mode"] == [expected == "1"], (case, seen)
            shown = f"jit_compile={expected == '1'}"
        else:
            assert seen["at_import"][name] == expected, (case, seen)  # set before torch_npu was imported
            assert [s[name] for s in seen["at_hccl"]] == [expected], (case, seen)  # and when HCCL started
            shown = f"{name}={expected}"
        if expected is None:
            assert name not in line
        else:
            assert shown + (" (yours)" if case == "yours" else "") in line, line


def test_the_example_scripts_export_the_same_defaults():
    text = (ROOT / "examples" / "aquila2" / "launch.sh").read_text()
    exported = dict(re.findall(r"export (\w+)=\$\{\1:-([^}]*)\}", text))
    assert exported == {s.name: s.default for s in npu_runtime.SETTINGS if s.default is not None}
    assert "HCCL_IF_BASE_PORT" in text  # named for two jobs on one node, not set
    for script in (ROOT / "examples" / "aquila2").glob("*_ptd*.sh"):
        # each script launches through launch.sh: its own ``source``, or the script it hands over to with ``exec``
        # (a wrapper: the QLoRA scripts run the LoRA ones); none sets a runtime variable of its own
        seen, body = [script], script.read_text()
        while "launch.sh" not in body:
            handed = re.search(r'^exec bash "\$\(dirname "\$0"\)/([\w.-]+\.sh)"', body, re.M)
            assert handed and script.parent / handed[1] not in seen, (seen, "neither sources launch.sh nor execs "
                                                                            "an example script that does")
            seen.append(script.parent / handed[1])
            body = seen[-1].read_text()
        for path in seen:
            assert not re.search(r"^export (%s)=" % "|".join(NAMES), path.read_text(), re.M), path


def test_quotes_from_torch_npu_are_in_the_wheel():
    wheel = torch_npu_wheel()
    if wheel is None:
        pytest.skip("the torch_npu 2.13.0 wheel is neither in .cache/wheels nor downloadable (no package index)")
    with zipfile.ZipFile(wheel) as z:
        config = z.read("torch_npu/npu/npu_config.py")
        blob = z.read("torch_npu/lib/libtorch_npu.so") + config
    quoted = [q for s in npu_runtime.SETTINGS for q in s.quotes]
    assert len(quoted) >= 5
    for q in quoted:
        assert q.encode() in blob, q
    # the line the jit setting's source cites (npu_config.py:98)
    assert config.decode().splitlines()[97].startswith("def set_compile_mode(jit_compile=False)")


@pytest.mark.parametrize("env,flag", [({"HCCL_CONNECT_TIMEOUT": "soon"}, "HCCL_CONNECT_TIMEOUT='soon'"),
                                      ({"HCCL_IF_BASE_PORT": "60000-60015"}, "HCCL_IF_BASE_PORT"),
                                      ({npu_runtime.JIT_ENV: "yes"}, npu_runtime.JIT_ENV)])
def test_a_value_the_runtime_would_misread_is_refused(env, flag):
    with pytest.raises(UsageError, match=re.escape(flag)):
        npu_runtime.check(env)
