"""The package's layers: every import (at module level or inside a function) goes to the same top-level module or to
one below it in ``LAYERS``, the one place the order is written. Product code never imports the test machinery
(``aquila_npu.testing``), which sits on top."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "aquila_npu"

# Lowest first. A module of a layer may import modules of its own top-level package or module, and of layers below.
LAYERS = (
    "errors",  # the one family of one-line errors
    "ports",  # a free TCP port
    "ranks",  # printing from several processes
    "flags",  # what the commands' flags share: the inert-flag table, number checks
    "launch",  # our commands in child processes (python -m, torchrun)
    "compat",  # the boundary to torch, torch_npu, megatron-core and peft
    "outputs",  # owned, atomic outputs; crash points
    "device",  # npu / cuda / cpu, backends
    "models",  # the registry and the one model definition
    "flops",  # FLOPs and device peaks
    "weights",  # the weight-mapping table, seeded weights
    "planning",  # the layout planner: memory from the model's shapes, layouts that fit
    "parallel",  # megatron-core's parallel state
    "checkpoint",  # Megatron and HF checkpoints, conversion
    "data",  # tokenizers, preprocessing, datasets
    "training",  # a training run (model transforms plug in from above)
    "lora",  # LoRA: layers, adapters, the training transform
    "inference",  # generation
    "evaluation",  # tasks and scoring
    "benchmarking",  # throughput and side-by-side measurements
    "checks",  # the selfcheck's checks
    "jobs",  # what a command does when it takes several libraries
    "cli",  # the commands: parsers and one library call each
    ("pretrain", "generate", "evaluate", "benchmark", "selfcheck", "demo", "preflight",
     "plan"),  # python -m aquila_npu.X shims
    "testing",  # test machinery (tiny models, the fake torch_npu): never imported by the product
)
RANK = {name: i for i, layer in enumerate(LAYERS) for name in ((layer,) if isinstance(layer, str) else layer)}


def top_level(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def our_imports(path: pathlib.Path):
    """(line, imported aquila_npu module) of every import in ``path``."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("aquila_npu.") and name.split(".")[1] in RANK:
                yield node.lineno, name


def test_every_top_level_module_has_a_layer():
    names = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert names == set(RANK), (names - set(RANK), set(RANK) - names)


def test_no_module_imports_a_higher_layer():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        here = top_level(module)
        if here == "__init__":
            continue
        for line, name in our_imports(path):
            there = name.split(".")[1]
            if there != here and RANK[there] > RANK[here]:
                upward.append(f"{path.relative_to(ROOT)}:{line}: {here} imports {name}")
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    """The walk above would report a product module importing the test machinery (the check can fail)."""
    fake = tmp_path / "aquila_npu" / "training" / "x.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from aquila_npu.testing.tiny_hf import TINY\n")
    assert [name for _, name in our_imports(fake)] == ["aquila_npu.testing.tiny_hf", "aquila_npu.testing.tiny_hf.TINY"]
    assert RANK["testing"] > RANK["training"]
