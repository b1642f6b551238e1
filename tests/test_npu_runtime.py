"""The real ``--device npu`` path, run end to end on the CPU through the fake torch_npu runtime
(``aquila_npu.testing.npu``; ``import torch_npu`` resolves to it in child processes, never in pytest's).

What is proven: the API calls and their order (torch_npu and transfer_to_npu against megatron-core's import-time
bindings, set_device before HCCL, ``Tensor.type()`` names, RNG tracker forks) and the numerics (losses equal the CPU
run's). Never speed: the fake NPU is the CPU.
"""

import ast
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from aquila_npu.testing.npu import runtime as npu_runtime
from aquila_npu.testing.npu import transfer_to_npu as npu_transfer
from helpers import (assert_one_line_error, build_assets, child_env, fake_npu_env, torch_npu_wheel, torchrun,
                     words)

FUSED = ["--use-fused-rmsnorm", "--use-flash-attn", "--use-fused-rotary-pos-emb", "--use-fused-swiglu"]
FUSED_OPS = ("npu_rms_norm", "npu_fusion_attention", "npu_rotary_mul", "npu_swiglu")
COMMON = ["--micro-batch-size", 2, "--global-batch-size", 4, "--seq-length", 32, "--lr", 1e-3,
          "--lr-decay-style", "constant", "--clip-grad", 1.0, "--log-interval", 1, "--eval-interval", 1000,
          "--mock-data"]
DTYPE_FLAGS = {"fp32": [], "bf16": ["--bf16"]}


def _python(code, *args, env=None, timeout=300):
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env or fake_npu_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _metrics(path, key="lm_loss"):
    with open(path) as f:
        return [r[key] for r in map(json.loads, f) if key in r]


def _reports(folder):
    """The fake runtime's per-process reports (events in order, op calls), by rank."""
    out = {}
    for name in os.listdir(folder):
        with open(os.path.join(folder, name)) as f:
            r = json.load(f)
        out[int(r["rank"] or 0)] = r
    return out


# ------------------------------------------------------------------------------------------------- the runtime
RUNTIME_WORKER = """
import json, os, torch
import torch_npu
out = {"version": torch_npu.__version__, "available": torch.npu.is_available(), "count": torch.npu.device_count(),
       "npu_type": torch.zeros(2, device="npu:1").type(), "bf16_type": torch.ones(1, dtype=torch.bfloat16).type(),
       "to": str(torch.ones(2).to("npu").device), "capability": torch.npu.get_device_capability()}
os.environ["TORCH_NPU_DEVICE_CAPABILITY"] = "8.0"
out["capability_env"] = list(torch.npu.get_device_capability())
for name, call in [("hccl_before_set_device", lambda: torch.distributed.init_process_group(
                        "hccl", rank=0, world_size=1, init_method="tcp://127.0.0.1:" + os.environ["PORT"])),
                   ("set_device_out_of_range", lambda: torch.npu.set_device(8))]:
    try:
        call()
        out[name] = "accepted"
    except RuntimeError as e:
        out[name] = str(e)
import torch_npu.contrib.transfer_to_npu
torch.cuda.set_device(3)
out["cuda_is_npu"] = [torch.cuda.current_device(), torch.cuda.get_device_name(), torch.ones(1).is_cuda,
                      str(torch.zeros(1, device="cuda").device), torch.cuda.is_available()]
torch.distributed.init_process_group("nccl", rank=0, world_size=1,
                                     init_method="tcp://127.0.0.1:" + os.environ["PORT2"])
out["backend"] = torch.distributed.get_backend()
t = torch.ones(3)
torch.distributed.all_reduce(t)
torch.distributed.broadcast(t, 0)
out["events"] = [e[0] for e in __import__("aquila_npu.testing.npu.runtime", fromlist=["events"]).events]
print(json.dumps(out))
"""


def test_fake_runtime_is_torch_npu_on_the_cpu():
    from aquila_npu.ports import free_port

    r = _python(RUNTIME_WORKER, env=fake_npu_env(PORT=free_port(), PORT2=free_port(),
                                                 AQUILA_FAKE_NPU_DEVICES=8))
    assert r["version"] == npu_runtime.FAKE_VERSION and r["available"] and r["count"] == 8
    assert (r["npu_type"], r["bf16_type"], r["to"]) == ("torch.npu.FloatTensor", "torch.npu.BFloat16Tensor", "cpu")
    assert r["capability"] is None and r["capability_env"] == [8, 0]  # as torch_npu: None unless configured
    assert "set_device" in r["hccl_before_set_device"] and "8 NPUs" in r["set_device_out_of_range"]
    assert r["cuda_is_npu"] == [3, npu_runtime.FAKE_DEVICE_NAME, True, "cpu", True]
    assert r["backend"] == "hccl"  # transfer_to_npu turned nccl into hccl
    assert r["events"] == ["import", "transfer_to_npu", "set_device", "hccl"]


def _wheel_text(path):
    wheel = torch_npu_wheel()
    if wheel is None:
        pytest.skip("the torch_npu 2.13.0 wheel is neither in .cache/wheels nor downloadable (no package index)")
    with zipfile.ZipFile(wheel) as z:
        return z.read(path).decode()


def _wheel_lists(tree):
    return {t.id: [ast.literal_eval(e) for e in node.value.elts] for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.List) for t in node.targets
            if isinstance(t, ast.Name)}


def test_fake_runtime_mirrors_the_wheel():
    """transfer_to_npu's white lists are the wheel's; every torch.npu name the fake offers exists in the wheel's
    torch_npu.npu.__all__, with the wheel's parameter names."""
    lists = _wheel_lists(ast.parse(_wheel_text("torch_npu/contrib/transfer_to_npu.py")))
    for ours, theirs in [("TORCH_FN_WHITE_LIST", "torch_fn_white_list"),
                         ("TORCH_TENSOR_FN_WHITE_LIST", "torch_tensor_fn_white_list"),
                         ("TORCH_MODULE_FN_WHITE_LIST", "torch_module_fn_white_list"),
                         ("TORCH_CUDA_FN_WHITE_LIST", "torch_cuda_fn_white_list"),
                         ("DEVICE_KWARGS_LIST", "device_kwargs_list")]:
        assert list(getattr(npu_transfer, ours)) == lists[theirs], ours
    init = ast.parse(_wheel_text("torch_npu/npu/__init__.py"))
    real_all = _wheel_lists(init)["__all__"]
    assert set(npu_runtime.NPU_API) <= set(real_all), set(npu_runtime.NPU_API) - set(real_all)
    defs = {}
    for path in ("__init__.py", "utils.py", "random.py", "memory.py", "streams.py"):
        for node in ast.walk(ast.parse(_wheel_text(f"torch_npu/npu/{path}"))):
            if isinstance(node, ast.FunctionDef) and node.name in npu_runtime.NPU_API:
                defs.setdefault(node.name, [a.arg for a in node.args.args])
    import inspect

    checked = 0
    for name, params in defs.items():
        ours = getattr(npu_runtime, name)
        if inspect.isfunction(ours):
            assert list(inspect.signature(ours).parameters)[:len(params)] == params, name
            checked += 1
    assert checked >= 20


# ---------------------------------------------------------------------------------------------------- ordering
ORDER_WORKER = """
import importlib, inspect, json, sys, torch
order = sys.argv[1]
cuda_before = {k: v for k, v in vars(torch.cuda).items() if inspect.isfunction(v) or inspect.isclass(v)}
stack = ["aquila_npu.training.run", "aquila_npu.inference.session"]  # megatron-core's training & inference modules
if order == "npu-first":
    import torch_npu, torch_npu.contrib.transfer_to_npu
else:
    for m in stack:
        importlib.import_module(m)
    import torch_npu
types_before = torch.zeros(1, dtype=torch.bfloat16).type()
from aquila_npu.device.setup import setup
dev = setup("npu")
for m in stack + ["megatron.core.transformer.moe.experts"]:  # the last one: imported after setup
    importlib.import_module(m)
stale, compiled = [], []
for name, mod in list(sys.modules.items()):
    if mod is None or name.split(".")[0] != "megatron":
        continue
    for attr, value in vars(mod).items():
        for v in (value if isinstance(value, tuple) else (value,)):
            for cname, orig in cuda_before.items():
                if v is orig and getattr(torch.cuda, cname) is not orig:
                    stale.append(f"{name}.{attr}")
        if inspect.isfunction(value) and "_torchdynamo_orig_callable" in vars(value):
            compiled.append(f"{name}.{attr}")
from megatron.core.tensor_parallel import layers, random
from megatron.core.transformer import module
from megatron.core import jit
from aquila_npu.testing.npu import runtime as npu_runtime
print(json.dumps({
    "stale": stale, "compiled": compiled, "jit_fuser_is_noop": jit.jit_fuser is jit.noop_decorator,
    "lazy_call": random._lazy_call is torch.npu._lazy_call, "device_ctx": random.device_ctx_manager is torch.npu.device,
    "float_types": [t is torch.npu.FloatTensor for t in module._FLOAT_TYPES],
    "bf16_types": [t is torch.npu.BFloat16Tensor for t in module._BF16_TYPES],
    "custom_fwd": layers.custom_fwd.keywords, "types": [types_before, torch.zeros(1, dtype=torch.bfloat16).type()],
    "megatron_before_transfer": [e[1] for e in npu_runtime.events if e[0] == "transfer_to_npu"][0],
    "events": [e[0] for e in npu_runtime.events]}))
"""


@pytest.mark.parametrize("order", ["megatron-first", "npu-first"])
def test_captured_cuda_symbols_are_replaced_whatever_the_import_order(order):
    """megatron-core binds torch.cuda objects at import (notes: tensor_parallel.random's _lazy_call / device,
    transformer.module's _FLOAT_TYPES, layers.custom_fwd, jit_fuser = torch.compile). Whether it was imported before
    transfer_to_npu (as our CLIs do: the fused-switch flags come from the backend module) or after, none of them is
    left after setup("npu"): checked against torch.cuda's own objects captured before anything was imported."""
    r = _python(ORDER_WORKER, order)
    assert bool(r["megatron_before_transfer"]) == (order == "megatron-first")
    if order == "megatron-first":
        assert "megatron.core.tensor_parallel.random" in r["megatron_before_transfer"]
    assert r["stale"] == [] and r["compiled"] == [] and r["jit_fuser_is_noop"]
    assert r["lazy_call"] and r["device_ctx"]  # torch's _lazy_call would queue RNG restores forever
    assert r["float_types"] == [False, True] and r["bf16_types"] == [False, True]
    assert r["custom_fwd"] == {"device_type": "npu"}
    # Tensor.type(): torch_npu names NPU tensors torch.npu.*; megatron-core's optimizer checks want torch.cuda.*
    assert r["types"] == ["torch.npu.BFloat16Tensor", "torch.cuda.BFloat16Tensor"]
    assert r["events"][:2] == ["import", "transfer_to_npu"] and r["events"].index("set_device") < r["events"].index(
        "hccl")


RNG_WORKER = """
import json, torch
import torch.nn.functional as F
from aquila_npu.device.setup import setup
from aquila_npu.parallel import initialize_model_parallel
from megatron.core import tensor_parallel
dev = setup("npu")
initialize_model_parallel(1, 1, seed=1234)
tracker = tensor_parallel.get_cuda_rng_tracker()
x = torch.ones(4096, device=dev.torch_device)
drop = lambda: F.dropout(x, 0.5, training=True).ne(0).tolist()
start = torch.npu.get_rng_state()
a = drop()
with tracker.fork():
    b = drop()
c = drop()
torch.npu.set_rng_state(start)
a2, c2 = drop(), drop()  # the default stream without the fork in between
torch.npu.manual_seed(1234 + 2718)  # megatron-core's model-parallel seed for tp rank 0
ref = drop()
tensor_parallel.model_parallel_cuda_manual_seed(1234)
with tracker.fork():
    b2 = drop()
print(json.dumps({"a": a == a2, "c": c == c2, "b_default": b in (a2, c2), "b_ref": b == ref, "b_again": b == b2,
                  "differ": sum(u != v for u, v in zip(b, c2))}))
"""


def test_rng_tracker_fork_really_switches_the_npu_generator():
    """megatron-core's tracker.fork() restores its state with _set_cuda_rng_state, which without the adaptation
    would go through torch's _lazy_call and be silently queued (notes §6): dropout inside the fork draws from the
    tracker's stream (seed + 2718), outside it the default stream goes on as if no fork happened."""
    r = _python(RNG_WORKER)
    assert r["a"] and r["c"]  # the fork took nothing from the default stream
    assert r["b_ref"] and r["b_again"] and not r["b_default"] and r["differ"] > 1000


# -------------------------------------------------------------------------------- pretrain / generate / evaluate
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("npu")
    return build_assets(str(root), layouts=((1, 1), (2, 2)))


def _train(env, nproc, metrics, *args):
    torchrun("-m aquila_npu.pretrain", nproc, [*COMMON, "--metrics-file", metrics, *args], env=env)
    return _metrics(metrics)


def _hf_greedy(hf_dir, ids, n):
    """HF greedy continuation of each prompt with the weights in ``hf_dir`` (a model built from the tiny config, not
    from_pretrained: see DEVELOPERS.md)."""
    from safetensors.torch import load_file

    from aquila_npu.testing.tiny_hf import tiny_llama

    model = tiny_llama()
    state = {}
    for f in os.listdir(hf_dir):
        if f.endswith(".safetensors"):
            state.update(load_file(os.path.join(hf_dir, f)))
    model.load_state_dict(state)
    out = []
    with torch.no_grad():
        for p in ids:
            g = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=n, pad_token_id=0)
            out.append(g[0, len(p):].tolist())
    return out


def _write_boolq(path, rows=8):
    import random

    rng = random.Random(2)
    with open(path, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"question": words(rng, 4), "title": words(rng, 2), "answer": rng.random() < 0.5,
                                "passage": words(rng, rng.randint(8, 20)).capitalize() + "."}) + "\n")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32"])
def test_pretrain_tp2_pp2_on_npu_equals_cpu_resumes_and_serves(assets, tmp_path, dtype):
    """torchrun -m aquila_npu.pretrain --device npu at tp2-pp2 with the four fused switches and sequence parallelism:
    losses equal the --device cpu run; resuming from its checkpoint repeats the last iteration bit for bit; generate
    from the result equals HF greedy on the same weights; evaluate equals evaluate on the CPU.

    ``dtype`` is a parameter so that the decoding path can be checked in bf16 where the NPU inference attention
    refuses fp32 (the tolerances below are fp32's)."""
    layout = ["--tensor-model-parallel-size", 2, "--pipeline-model-parallel-size", 2, "--sequence-parallel",
              "--train-iters", 3, "--tokenizer-name-or-path", assets["hf"], *DTYPE_FLAGS[dtype]]
    cpu = _train(None, 4, tmp_path / "cpu.jsonl", "--load", assets[2, 2], "--device", "cpu", *layout)
    ck, reports = tmp_path / "ck", tmp_path / "reports"
    env = fake_npu_env(AQUILA_FAKE_NPU_REPORT=reports)
    npu = _train(env, 4, tmp_path / "npu.jsonl", "--load", assets[2, 2], "--device", "npu", *FUSED, *layout,
                 "--save", ck, "--save-interval", 2)
    assert len(cpu) == len(npu) == 3 and len(set(npu)) == 3  # the weights move
    assert np.max(np.abs(np.array(npu) - cpu) / np.abs(cpu)) < 1e-5, (cpu, npu)
    by_rank = _reports(reports)
    assert sorted(by_rank) == [0, 1, 2, 3]
    for rank, r in by_rank.items():
        kinds = [e[0] for e in r["events"]]
        assert kinds[:2] == ["import", "transfer_to_npu"]
        assert ["set_device", rank] in r["events"]  # local rank = rank on one node
        assert kinds.index("set_device") < kinds.index("hccl")
        assert all(r["calls"].get(op, 0) > 0 for op in FUSED_OPS), r["calls"]

    (ck / "latest_checkpointed_iteration.txt").write_text("2")  # resume from iteration 2 (3 was saved too)
    resumed = _train(env, 4, tmp_path / "resumed.jsonl", "--load", ck, "--device", "npu", *FUSED, *layout,
                     "--save", ck)
    assert resumed == npu[2:], (npu, resumed)
    assert (ck / "latest_checkpointed_iteration.txt").read_text() == "3"

    from transformers import AutoTokenizer

    from aquila_npu.checkpoint.convert import to_huggingface
    from aquila_npu.checkpoint.megatron_io import MegatronReader

    hf_trained = to_huggingface(MegatronReader(str(ck)), str(tmp_path / "hf-trained"), hf_dir_for_files=assets["hf"])
    tok = AutoTokenizer.from_pretrained(assets["hf"])
    prompts = ["kalo mi taren", "北京是中国的首都"]
    out = tmp_path / "gen.jsonl"
    torchrun("-m aquila_npu.generate", 4, ["--load", ck, "--tokenizer-name-or-path", assets["hf"], "--device", "npu",
                                           *FUSED, "--greedy", "--max-new-tokens", 12, "--output", out,
                                           *DTYPE_FLAGS[dtype], *[a for p in prompts for a in ("--prompt", p)]],
             env=env)
    rows = [json.loads(line) for line in open(out, encoding="utf-8")]
    assert [r["token_ids"] for r in rows] == _hf_greedy(hf_trained, [tok.encode(p) for p in prompts], 12)

    data = _write_boolq(tmp_path / "boolq.jsonl")
    results = {}
    for device, e in (("cpu", None), ("npu", env)):
        results[device] = tmp_path / f"eval-{device}.json"
        torchrun("-m aquila_npu.evaluate", 4, ["--task", "boolq", "--task-data-path", data, "--load", ck,
                                               "--tokenizer-name-or-path", assets["hf"], "--device", device,
                                               *(FUSED if device == "npu" else []), *DTYPE_FLAGS[dtype],
                                               "--micro-batch-size", 4, "--output", results[device]], env=e)
    a, b = (json.load(open(results[d]))["records"] for d in ("cpu", "npu"))
    assert len(a) == len(b) == 8
    for p, q in zip(a, b):
        assert p["prediction"] == q["prediction"]
        assert abs(p["logprob_yes"] - q["logprob_yes"]) < 1e-5 and abs(p["logprob_no"] - q["logprob_no"]) < 1e-5


@pytest.mark.slow
def test_bf16_distributed_optimizer_on_npu_passes_megatron_type_checks(assets, tmp_path):
    """megatron-core's bf16 optimizers accept only params whose type() is 'torch.cuda.*Tensor'; on NPU it is
    'torch.npu.*' (adapted by compat.megatron_core.adapt_to_npu). Plain modules on both devices: the same losses."""
    args = ["--load", assets[1, 1], "--train-iters", 2, "--bf16", "--use-distributed-optimizer",
            "--tokenizer-name-or-path", assets["hf"]]
    cpu = _train(None, 2, tmp_path / "cpu.jsonl", "--device", "cpu", *args)
    npu = _train(fake_npu_env(), 2, tmp_path / "npu.jsonl", "--device", "npu", *args)
    assert cpu == npu and len(npu) == 2


@pytest.mark.slow
def test_checkpoints_move_between_cpu_and_npu_with_no_load_rng(assets, tmp_path):
    """RNG states differ per device (CPU Mersenne Twister, CUDA / NPU Philox): resuming another device's checkpoint
    is a one-line error naming --no-load-rng; with it, training continues with the uninterrupted run's losses
    (no dropout here), both ways."""
    env = fake_npu_env()
    base = ["--load", assets[1, 1], "--tokenizer-name-or-path", assets["hf"]]
    straight = _train(None, 1, tmp_path / "straight.jsonl", *base, "--device", "cpu", "--train-iters", 4)
    for first, then in (("cpu", "npu"), ("npu", "cpu")):
        ck = tmp_path / f"ck-{first}"
        e1, e2 = (env if d == "npu" else None for d in (first, then))
        _train(e1, 1, tmp_path / f"{first}.jsonl", *base, "--device", first, "--train-iters", 2, "--save", ck)
        resume = ["--load", ck, "--tokenizer-name-or-path", assets["hf"], "--device", then, "--train-iters", 4]
        proc = subprocess.run([sys.executable, "-m", "aquila_npu.pretrain", *map(str, [*COMMON, *resume])],
                              env=e2 or child_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "--no-load-rng" in proc.stderr
        assert_one_line_error(proc.stderr)
        assert f"saved on {first} and this run is on {then}" in proc.stderr
        resumed = _train(e2, 1, tmp_path / f"{first}-{then}.jsonl", *resume, "--no-load-rng")
        assert np.allclose(resumed, straight[2:], rtol=1e-5, atol=0), (first, then, straight, resumed)


# ------------------------------------------------------------------------------------------ the first-hour report
@pytest.mark.slow
def test_selfcheck_report_runs_every_check_on_the_fake_runtime(tmp_path):
    """python -m aquila_npu.selfcheck --report --device npu: every check runs and passes on two fake NPUs; the
    benchmark's figures are labelled with the fake device (CPU speed, never NPU throughput)."""
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "aquila_npu.selfcheck", "--report", "--device", "npu", "--nproc", "2",
                           "--comm-size-mb", "1", "--out", str(out)], env=fake_npu_env(), capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["passed"] and r["device_name"] == npu_runtime.FAKE_DEVICE_NAME
    assert r["software"]["torch_npu"] == npu_runtime.FAKE_VERSION
    checks = r["checks"]
    assert [checks[c]["status"] for c in ("ops", "collectives", "logits", "training", "resume", "benchmark")] == \
        ["pass"] * 5 + ["done"]
    assert {(x["op"].split()[0], x["dtype"]) for x in checks["ops"]["results"]} == \
        {(op, dt) for op in FUSED_OPS for dt in ("bfloat16", "float16")}
    from aquila_npu.checks.collectives import USES

    assert [(x["op"], x["dtype"]) for x in checks["collectives"]["results"]] == \
        [(op, dt) for dt, ops in USES.items() for op in ops]
    assert checks["training"]["tp"] == 2 and checks["training"]["dtype"] == "bf16"
    bench = checks["benchmark"]["result"]
    assert bench["label"] == npu_runtime.FAKE_DEVICE_NAME and bench["device"]["peak_tflops"] is None  # no MFU
    assert "verdict: every check passed" in proc.stdout


@pytest.mark.slow
def test_shipped_training_reference_is_the_cpu_run(tmp_path):
    """The reference losses shipped in aquila_npu/checks/reference.json are what the CPU computes now (fp32, tp1):
    the training check compares an NPU node against the right numbers."""
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "aquila_npu.selfcheck", "--report", "--device", "cpu", "--checks",
                           "training", "--out", str(out)], env=child_env(), capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    training = json.loads(out.read_text())["checks"]["training"]
    assert training["tp"] == 1 and training["dtype"] == "fp32" and training["max_rel_err"] < 1e-5


def test_a_stale_training_reference_is_refused_in_one_line(tmp_path):
    """The shipped reference records what it was made from; a reference of other inputs (here: other flags) is
    refused before any check runs, naming what differs and the command that regenerates it."""
    from aquila_npu.checks import training
    from aquila_npu.errors import StaleReference

    assert training.load_reference()["inputs"] == training.inputs()  # the shipped one is current
    stale = json.loads(open(training.REFERENCE).read())
    stale["inputs"]["flags"] = stale["inputs"]["flags"] + ["--lr", "1"]
    path = tmp_path / "reference.json"
    path.write_text(json.dumps(stale))
    with pytest.raises(StaleReference, match=r"\(flags differ\): regenerate it with python -m aquila_npu.checks.training"):
        training.load_reference(str(path))
