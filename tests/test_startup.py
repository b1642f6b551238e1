"""Start-up of the inference commands (issue 15, part 3): what ``--help`` and input errors import, megatron-core's
Apex / Transformer Engine notices hidden by their exact text only, and the banner naming the modules actually built.

Speed itself is measured by benchmarks (docs/inference.md), never timed here.
"""

import os
import subprocess
import sys

import pytest

from helpers import assert_one_line_error, build_assets, child_env, fake_npu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTICE_WORDS = ("Apex", "Transformer Engine", "cuda_graph_scope", "full scope is deprecated")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(str(tmp_path_factory.mktemp("startup")), layouts=((1, 1),))


def imported_modules(importtime_stderr: str):
    """The module names of ``python -X importtime`` lines (``import time: self | cumulative | name``)."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if not name.startswith("imported"):
                names.add(name)
    return names


# (command, arguments, what stdout or the error line must hold, modules that prove the command's own imports were
# listed: -X importtime does not list importlib's imports, so for evaluate's task modules one of their own imports)
TRAIN_FLAGS = ["--model", "aquila2-tiny", "--seq-length", "32", "--micro-batch-size", "1", "--global-batch-size", "1",
               "--train-iters", "1", "--lr", "1e-3"]
QUICK_ANSWERS = {
    "generate-help": ("generate", ["--help"], "--max-new-tokens", ["aquila_npu.cli.generate"]),
    "generate-bad-load": ("generate", ["--load", "/no/such/checkpoint", "--tokenizer-name-or-path", "/no/tok",
                                       "--prompt", "hi"], "--load /no/such/checkpoint: no such directory",
                          ["aquila_npu.cli.generate"]),
    "evaluate-help": ("evaluate", ["--help"], "--task-data-path", ["aquila_npu.cli.evaluate",
                                                                   "aquila_npu.evaluation.sandbox"]),
    "evaluate-bad-data": ("evaluate", ["--task", "boolq", "--task-data-path", "/no/such/boolq", "--load", "/no/ckpt",
                                       "--tokenizer-name-or-path", "/no/tok"], "/no/such/boolq",
                          ["aquila_npu.cli.evaluate", "aquila_npu.evaluation.sandbox"]),
    # issue 29: every command answers a missing input before torch, transformers or megatron-core load
    "pretrain-bad-data": ("pretrain", ["--data-path", "/no/data", "--tokenizer-name-or-path", ROOT,  # a folder
                                       *TRAIN_FLAGS], "/no/data.bin", ["aquila_npu.cli.pretrain"]),
    "pretrain-bad-tokenizer": ("pretrain", ["--mock-data", "--tokenizer-name-or-path", "/no/tok", *TRAIN_FLAGS],
                               "--tokenizer-name-or-path: /no/tok does not exist", ["aquila_npu.cli.pretrain"]),
    "convert-bad-load": ("tools/checkpoint/convert_ckpt.py", ["--load-dir", "/no/ckpt", "--save-dir", "/no/out",
                                                              "--target-tensor-parallel-size", "1", "--loader",
                                                              "llama2_hf", "--saver", "megatron"],
                         "--load-dir /no/ckpt", ["aquila_npu.cli.convert"]),
    "preprocess-bad-input": ("tools/preprocess_data.py", ["--input", "/no/in.json", "--output-prefix", "/no/x",
                                                          "--tokenizer-name-or-path", ROOT],  # a folder
                             "/no/in.json", ["aquila_npu.cli.preprocess"]),
}


def command_line(command):
    """``python -m aquila_npu.<command>``, or a script of the repository (tools/...)."""
    return [os.path.join(ROOT, command)] if command.endswith(".py") else ["-m", f"aquila_npu.{command}"]


@pytest.mark.parametrize("case", sorted(QUICK_ANSWERS))
def test_help_and_input_errors_import_neither_torch_nor_megatron(case):
    command, args, expected, own = QUICK_ANSWERS[case]
    r = subprocess.run([sys.executable, "-X", "importtime", *command_line(command), *args],
                       env=child_env(), capture_output=True, text=True, timeout=300)
    names = imported_modules(r.stderr)
    assert set(own) <= names  # the parse of importtime's lines works
    heavy = sorted(n for n in names if n.split(".")[0] in ("torch", "megatron", "transformers"))
    assert not heavy, heavy[:10]
    if args[0] == "--help":
        assert r.returncode == 0 and expected in r.stdout
    else:
        assert r.returncode == 2
        errors = [line for line in r.stderr.splitlines() if not line.startswith("import time:")]
        assert_one_line_error("\n".join(errors))
        assert expected in errors[0]


def test_generate_prints_no_megatron_notices_and_names_its_modules(assets):
    env = child_env()
    del env["PYTHONWARNINGS"]  # child_env() quiets warnings; a user's shell has Python's default filters
    r = subprocess.run([sys.executable, "-m", "aquila_npu.generate", "--load", assets[1, 1], "--tokenizer-name-or-path",
                        assets["hf"], "--prompt", "kalo mi", "--max-new-tokens", "2", "--device", "cpu"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    noisy = [line for line in r.stderr.splitlines() if any(w in line for w in NOTICE_WORDS)]
    assert not noisy, noisy
    banner = next(line for line in r.stdout.splitlines() if line.startswith("python -m aquila_npu.generate: 1 prompt"))
    assert "attention SDPAAttention" in banner and "norm RMSNorm" in banner, banner


def test_npu_banner_names_the_fused_modules(assets):
    r = subprocess.run([sys.executable, "-m", "aquila_npu.generate", "--load", assets[1, 1], "--tokenizer-name-or-path",
                        assets["hf"], "--prompt", "kalo mi", "--max-new-tokens", "1", "--device", "npu",
                        "--use-fused-rmsnorm", "--use-flash-attn", "--use-fused-rotary-pos-emb", "--use-fused-swiglu"],
                       env=fake_npu_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    banner = next(line for line in r.stdout.splitlines() if line.startswith("python -m aquila_npu.generate: 1 prompt"))
    for name in ("NpuFlashAttention", "NpuRMSNorm", "NpuSwiGLU", "npu_rope"):
        assert name in banner, banner


FILTER_CHECK = r"""
import warnings
from aquila_npu.device.notices import MEGATRON_FALLBACK_NOTICES, hide_megatron_fallback_notices

hide_megatron_fallback_notices()
hide_megatron_fallback_notices()  # idempotent
for i, text in enumerate(MEGATRON_FALLBACK_NOTICES):
    registry = {}
    warnings.warn_explicit(text, UserWarning, "mc.py", 10 + i, module="megatron.core.x", registry=registry)
    warnings.warn_explicit(text + " (changed)", UserWarning, "mc.py", 20 + i, module="megatron.core.x",
                           registry=registry)
    warnings.warn_explicit(text, UserWarning, "other.py", 30 + i, module="other", registry={})
    warnings.warn_explicit(text, DeprecationWarning, "mc.py", 40 + i, module="megatron.core.x", registry={})
warnings.warn_explicit("another megatron warning", UserWarning, "mc.py", 50, module="megatron.core.y", registry={})
"""


def test_notice_filter_hides_exactly_the_four_texts_from_megatron_core():
    r = subprocess.run([sys.executable, "-c", FILTER_CHECK], env=child_env(PYTHONWARNINGS="default"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    from aquila_npu.device.notices import MEGATRON_FALLBACK_NOTICES

    shown = [line for line in r.stderr.splitlines() if "Warning:" in line]
    for text in MEGATRON_FALLBACK_NOTICES:
        assert not any(line.endswith("UserWarning: " + text) and line.startswith("mc.py") for line in shown), shown
        assert any(line.endswith(f"UserWarning: {text} (changed)") for line in shown), text
        assert any(line.startswith("other.py") and line.endswith(text) for line in shown), text
        assert any(line.endswith("DeprecationWarning: " + text) for line in shown), text
    assert any(line.endswith("another megatron warning") for line in shown)
    assert len(shown) == 3 * len(MEGATRON_FALLBACK_NOTICES) + 1, shown


def test_generate_does_not_import_torchs_compiler(assets):
    """megatron-core's torch.compile decorations wait for first use (compat.torch.import_megatron_core): a generate run
    never imports inductor's compile_fx, which each decoration imported (with dynamo: 0.9 s of its start-up). On
    torch 2.6, DTensor's own imports bring dynamo; newer torch imports neither."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "aquila_npu.generate", "--load", assets[1, 1],
                        "--tokenizer-name-or-path", assets["hf"], "--prompt", "kalo mi", "--max-new-tokens", "2",
                        "--device", "cpu"], env=child_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    names = imported_modules(r.stderr)
    assert "megatron.core.jit" in names and "megatron.core.fusions.fused_bias_swiglu" in names
    assert "torch._inductor.compile_fx" not in names


def test_deferred_compile_compiles_at_first_call_as_torch_compile_would():
    from aquila_npu.compat import megatron_core as compat_mcore
    from aquila_npu.compat import torch as compat_torch

    calls = []

    def fake_compile(fn, **options):
        calls.append((fn, options))
        return lambda *a, **k: ("compiled", fn(*a, **k))

    deferred = compat_torch.compile_on_first_call(fake_compile)

    def f(x, y=1):
        return x + y

    g = deferred(f)
    h = deferred(dynamic=False)(f)  # the decorator-factory form
    assert calls == [] and g.__name__ == "f"
    assert g(1, y=2) == ("compiled", 3) and g(2) == ("compiled", 3)
    assert h(0) == ("compiled", 1)
    assert calls == [(f, {}), (f, {"dynamic": False})]  # once per decorated function, with its options
    assert compat_mcore.npu_counterpart(g) is f  # the NPU adaptation unwraps it as it unwraps torch.compile's wrappers


IMPORT_CHECK = r"""
import sys, torch
real = torch.compile
from aquila_npu.compat.torch import import_megatron_core
import_megatron_core()
import megatron.core.jit as jit
from megatron.core.fusions import fused_bias_swiglu
assert torch.compile is real
assert jit.jit_fuser is not real
assert fused_bias_swiglu.bias_swiglu._torchdynamo_orig_callable.__name__ == "bias_swiglu"
assert "torch._inductor.compile_fx" not in sys.modules
print("ok")
"""


def test_import_megatron_core_restores_torch_compile():
    r = subprocess.run([sys.executable, "-c", IMPORT_CHECK], env=child_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def _commands():
    """Every command module of aquila_npu.cli (each has ``main``), found on disk: nothing hand-listed."""
    import pathlib

    folder = pathlib.Path(__file__).resolve().parents[1] / "aquila_npu" / "cli"
    return sorted(p.stem for p in folder.glob("*.py") if "\ndef main(" in p.read_text())


def test_every_command_is_found():
    assert {"convert", "preprocess", "pretrain", "generate", "evaluate", "benchmark", "selfcheck", "demo"} <= \
        set(_commands())


@pytest.mark.parametrize("command", _commands())
def test_every_commands_help_imports_neither_torch_nor_megatron(command):
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", f"aquila_npu.cli.{command}", "--help"],
                       env=child_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-2000:]
    names = imported_modules(r.stderr)
    assert "aquila_npu.cli.common" in names  # the parse of importtime's lines works (the command runs as __main__)
    heavy = sorted(n for n in names if n.split(".")[0] in ("torch", "megatron", "transformers", "peft"))
    assert not heavy, heavy[:10]
