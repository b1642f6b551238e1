"""Loss drift, located (issue 27, part 3): ``pretrain --layer-stats`` on the fake NPU runtime (fused kernels) and on
the CPU from the same checkpoint and data agree layer by layer, as do two layouts on the CPU; with one kernel of the
emulator deliberately wrong, ``selfcheck --compare`` names its layer and the first iteration; bad files are one
line."""

import functools
import json
import subprocess
import sys

import pytest

from aquila_npu.checks import drift
from aquila_npu.cli.pretrain import main as pretrain_main
from aquila_npu.cli.selfcheck import main as selfcheck_main

from helpers import build_assets, call_main, fake_npu_env, forked, forked_ranks

FUSED = ["--use-fused-rmsnorm", "--use-flash-attn", "--use-fused-rotary-pos-emb", "--use-fused-swiglu"]
COMMON = ["--mock-data", "--micro-batch-size", "2", "--global-batch-size", "2", "--seq-length", "32", "--lr", "1e-3",
          "--lr-decay-style", "constant", "--train-iters", "2", "--layer-stats-iters", "2", "--log-interval", "1",
          "--seed", "5"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from aquila_npu.checkpoint.convert import to_megatron
    from aquila_npu.checkpoint.hf_io import HFReader

    root = tmp_path_factory.mktemp("drift")
    out = build_assets(str(root), layouts=((1, 1),))
    # tp1 and tp2 with the same vocabulary padding: megatron-core pads to a multiple of divisible-by x tp, so 2 gives
    # 1004 rows at both (4 gave 1004 and 1008, and a padded logit takes part in the softmax: the losses differed)
    for tp, pp in ((1, 1), (2, 2)):
        out["padded", tp, pp] = str(root / f"mg-d2-tp{tp}-pp{pp}")
        to_megatron(HFReader(out["hf"]), out["padded", tp, pp], tp, pp, make_vocab_size_divisible_by=2)
    return out


def _cpu(assets, tmp_path, name, layout=(1, 1), checkpoint=None, *extra):
    out = tmp_path / f"{name}.jsonl"
    argv = [*COMMON, "--load", checkpoint or assets[layout], "--tokenizer-name-or-path", assets["hf"], "--device", "cpu",
            "--layer-stats", str(out), "--tensor-model-parallel-size", str(layout[0]),
            "--pipeline-model-parallel-size", str(layout[1]), *extra]
    nproc = layout[0] * layout[1]
    call = functools.partial(pretrain_main, [str(a) for a in argv])
    (tmp_path / name).mkdir()
    codes = forked_ranks(call, nproc, tmp_path / name) if nproc > 1 else [forked(call, tmp_path / name / "rank0.log")]
    assert codes == [0] * nproc, (tmp_path / name / "rank0.log").read_text()[-3000:]
    return out


def _npu(assets, tmp_path, name, **env):
    out = tmp_path / f"{name}.jsonl"
    argv = [*COMMON, "--load", assets[1, 1], "--tokenizer-name-or-path", assets["hf"], "--device", "npu", *FUSED,
            "--layer-stats", out]
    r = subprocess.run([sys.executable, "-m", "aquila_npu.pretrain", *map(str, argv)],
                       env=fake_npu_env(AQUILA_FAKE_NPU_DEVICES=1, **env), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "layer statistics of iterations 1-2" in r.stdout
    return out


def _compare(a, b, capsys, *extra):
    rc, err = call_main(selfcheck_main, ["--compare", a, b, *extra], capsys)
    return rc, err


@pytest.mark.slow
def test_fake_npu_agrees_with_the_cpu_then_names_the_perturbed_layer(assets, tmp_path, capsys):
    cpu = _cpu(assets, tmp_path, "cpu")
    npu = _npu(assets, tmp_path, "npu")
    rc, err = _compare(npu, cpu, capsys)
    assert rc == 0, err
    meta, rows = drift.read(str(npu), "--compare")
    assert meta["device"] == "npu" and meta["dtype"] == "fp32" and len(rows) == 2
    keys = rows[0]["norms"]
    assert {"embedding.output", "layer1.input", "layer4.output", "final_norm.output", "logits",
            "grad.decoder.layers.3.mlp.linear_fc1.weight", "grad.embedding.word_embeddings.weight"} <= set(keys)
    # the third SwiGLU of every forward (4 layers, one micro-batch an iteration) 5% off: layer 3, iteration 1
    wrong = _npu(assets, tmp_path, "npu-wrong", AQUILA_FAKE_NPU_PERTURB="npu_swiglu@2/4*1.05")
    rc, err = _compare(wrong, cpu, capsys)
    assert rc == 1, err
    assert "part at iteration 1, layer 3 (decoder.layers.2) output" in err and "its input agrees" in err, err
    assert "> 0.0001" in err, err  # fp32's tolerance


@pytest.mark.slow
def test_two_layouts_on_the_cpu_agree_layer_by_layer(assets, tmp_path, capsys):
    one = _cpu(assets, tmp_path, "tp1", checkpoint=assets["padded", 1, 1])
    four = _cpu(assets, tmp_path, "tp2pp2", (2, 2), assets["padded", 2, 2], "--sequence-parallel")
    rc, err = _compare(one, four, capsys)
    assert rc == 0, err
    a, b = drift.read(str(one), "--compare"), drift.read(str(four), "--compare")
    assert set(a[1][0]["norms"]) == set(b[1][0]["norms"])  # every layer, logits and gradient, whatever the layout
    assert drift.compare(a, b)["iterations"][0]["max_rel"] < 1e-5


def _stats(path, meta, norms_by_it):
    with open(path, "w") as f:
        f.write(json.dumps({"meta": meta}) + "\n")
        for it, norms in norms_by_it:
            f.write(json.dumps({"iteration": it, "loss": 1.0, "norms": norms}) + "\n")
    return str(path)


def test_unrelated_runs_and_bad_files_are_one_line(tmp_path, capsys):
    meta = {"model": "m", "num_layers": 1, "seq_length": 8, "global_batch_size": 2, "seed": 1, "data": "mock",
            "first_iteration": 1, "dtype": "fp32"}
    a = _stats(tmp_path / "a.jsonl", meta, [(1, {"layer1.output": 1.0})])
    b = _stats(tmp_path / "b.jsonl", {**meta, "seed": 2}, [(1, {"layer1.output": 1.0})])
    rc, err = _compare(a, b, capsys)
    assert rc == 2 and "not runs of the same model and data (seed: 1 vs 2)" in err
    (tmp_path / "c.jsonl").write_text("not json\n")
    rc, err = _compare(a, str(tmp_path / "c.jsonl"), capsys)
    assert rc == 2 and "line 1 is not JSON" in err
    rc, err = _compare(a, str(tmp_path / "none.jsonl"), capsys)
    assert rc == 2 and "no such file" in err
    rc, err = call_main(pretrain_main, ["--mock-data", "--train-iters", "1", "--layer-stats", str(tmp_path)], capsys)
    assert rc == 2 and "is a directory" in err
