"""python -m aquila_npu.benchmark (issue 7): the CPU acceptance run writes a JSON result whose figures follow from the
training process's own step times, --compare prints the table with the right ratios, --plot writes a PNG, the FLOP
formula equals a hand count and torch's FLOP counter on a Hugging Face LLaMA, bad input fails clearly."""

import json
import os
import statistics
import time

import pytest

from helpers import ROOT, assert_help_documents_every_flag, run_module

def _cli(*args, cwd=None, timeout=600):
    return run_module("aquila_npu.benchmark", *args, cwd=cwd or ROOT, timeout=timeout)


def _main(capsys, *args, cwd=None):
    """The CLI in this process (no interpreter start-up): (exit status, stdout, stderr)."""
    from aquila_npu.cli.benchmark import main

    here = os.getcwd()
    os.chdir(cwd or ROOT)
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse errors
        rc = e.code
    finally:
        os.chdir(here)
    out = capsys.readouterr()
    return rc, out.out, out.err


def hand_training_flops_per_token(h, f, layers, heads, groups, vocab, seq):
    """Every matmul of a LLaMA/Aquila2 layer, counted one by one (multiply-accumulates per token, forward)."""
    d = h // heads
    per_layer = {
        "q_proj": h * heads * d,
        "k_proj": h * groups * d,
        "v_proj": h * groups * d,
        "o_proj": heads * d * h,
        "scores q.k over all seq keys, every head": heads * seq * d,
        "weighted sum of seq values, every head": heads * seq * d,
        "gate_proj": h * f,
        "up_proj": h * f,
        "down_proj": f * h,
    }
    forward_macs = layers * sum(per_layer.values()) + h * vocab  # + output layer
    return 3 * 2 * forward_macs  # 2 FLOPs per MAC; backward = 2 x forward


def _metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------------- FLOP formula
def test_flop_formula_equals_a_hand_count():
    from aquila_npu.flops import training_flops_per_token
    from aquila_npu.models.registry import ModelSpec, get_model_spec

    spec = ModelSpec("t", hidden_size=64, intermediate_size=176, num_layers=3, num_attention_heads=8,
                     num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128)
    # small enough to check by eye: per layer 4096 + 1024 + 1024 + 4096 + 2*8*48*8 + 3*64*176 = 50176 MACs,
    # 3 layers + 64*1000 output = 214528 MACs -> x 6 = 1287168 FLOPs per token at seq 48
    assert hand_training_flops_per_token(64, 176, 3, 8, 2, 1000, 48) == 1287168
    assert training_flops_per_token(spec, 48) == 1287168
    assert training_flops_per_token(spec, 48, padded_vocab=1008) == 1287168 + 6 * 64 * 8
    s7 = get_model_spec("aquila2-7b")
    assert training_flops_per_token(s7, 2048) == hand_training_flops_per_token(4096, 11008, 32, 32, 32, 100008, 2048)
    s34 = get_model_spec("aquila2-34b")  # GQA: 48 heads, 8 key/value groups
    assert training_flops_per_token(s34, 4096) == hand_training_flops_per_token(6144, 24576, 60, 48, 8, 100008, 4096)


def test_flop_formula_equals_torch_flop_counter_on_hf_llama():
    """Training (forward + backward) FLOPs that torch counts on a Hugging Face LLaMA of the same shape."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from aquila_npu.flops import training_flops_per_token
    from aquila_npu.models.registry import ModelSpec
    from aquila_npu.testing.tiny_hf import tiny_llama

    spec = ModelSpec("t", hidden_size=64, intermediate_size=176, num_layers=2, num_attention_heads=8,
                     num_key_value_heads=4, vocab_size=1000, max_position_embeddings=128, bos_token_id=1,
                     eos_token_id=2, torch_dtype="float32")
    model = tiny_llama(spec).train()
    batch, seq = 2, 48
    ids = torch.randint(0, spec.vocab_size, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    assert counter.get_total_flops() == training_flops_per_token(spec, seq) * batch * seq


# --------------------------------------------------------------------------------------------------- device peaks
def test_device_peaks_by_the_name_torch_reports():
    """Ascend SoCs by their exact CANN / torch_npu name, with the peak derived from CANN's platform config (AI cores x
    cube clock x 8192 FLOP per cycle; the figures below are worked out by hand from the .ini files) or Huawei's
    published one; NVIDIA GPUs by model and form factor; anything else has no peak until --device-peak-tflops."""
    from aquila_npu.flops import device_peak, table

    expected = {"Ascend910B1": 363.7, "Ascend910B2": 353.9, "Ascend910B3": 294.9, "Ascend910B4": 245.8,
                "Ascend910_9392": 363.7, "Ascend910_9362": 245.8, "Ascend910A": 256.0,  # Huawei's published figure
                "NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0,
                "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100 80GB PCIe": 312.0, "NVIDIA H200": 989.4}
    for name, tflops in expected.items():
        assert device_peak(name).tflops == tflops, name
    assert device_peak("ascend910b2").tflops == 353.9  # case does not matter
    assert device_peak("Ascend910B").tflops == 221.2  # the first-generation SKU of that name, not a 910B1-B4
    assert "ai_core_cnt=24, cube_freq=1800" in device_peak("Ascend910B2").source
    assert "256 TFLOPS" in device_peak("Ascend910A").source
    for unknown in ("NVIDIA GH200 480GB", "NVIDIA H200 NVL", "NVIDIA GeForce RTX 4090", "Ascend910_95", "Ascend310P3"):
        peak = device_peak(unknown)
        assert peak.tflops is None and "--device-peak-tflops" in peak.source and unknown in peak.source
    assert device_peak("NVIDIA GeForce RTX 4090", 165.2).tflops == 165.2  # the flag wins, for any device
    assert device_peak("Ascend910B2", 300.0).source == "--device-peak-tflops"
    assert device_peak(None).tflops is None  # the CPU
    assert all(p.tflops and p.source for p in table().values())
    documented = {}  # docs/benchmark.md's table is this one
    for line in (ROOT / "docs" / "benchmark.md").read_text().splitlines():
        if line.startswith("| `"):
            name, tflops = (c.strip() for c in line.strip("|").split("|")[:2])
            documented[name.strip("`")] = float(tflops)
    assert documented == {name: p.tflops for name, p in table().items()}


# ------------------------------------------------------------------------------------------------------ CPU runs
def test_acceptance_cpu_run_writes_a_json_result(tmp_path):
    proc = _cli("--model", "aquila2-tiny", "--iters", 5, "--fused", "both", "--log-dir", tmp_path / "logs",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = list((tmp_path / "benchmarks" / "results").glob("*.json"))
    assert len(written) == 1 and written[0].name.startswith("cpu-"), written  # the default place
    res = json.loads(written[0].read_text())

    assert res["schema"] == "aquila_npu.benchmark/1"
    assert res["device"]["kind"] == "cpu" and res["device"]["is_cpu"] and "CPU" in res["label"]
    assert res["device"]["peak_tflops"] is None and "not accelerator throughput" in res["device"]["note"]
    assert res["software"]["torch"] and res["software"]["megatron_core"] == "0.16.1"
    st = res["settings"]
    assert (st["model"], st["num_layers"], st["seq_length"], st["dtype"]) == ("aquila2-tiny", 4, 256, "fp32")
    assert (st["micro_batch_size"], st["global_batch_size"], st["nproc"], st["warmup_iters"], st["iters"]) == \
        (1, 1, 1, 3, 5)
    # no fused kernels on a CPU: said plainly, the unfused run measured
    assert set(res["runs"]) == {"unfused"}
    assert res["fused_vs_unfused"]["available"] is False and "cpu" in res["fused_vs_unfused"]["reason"]
    assert "no fused kernels" in proc.stdout and "CPU figures" in proc.stdout
    # one process: no gradient reduction, so no overlap comparison, said plainly
    assert res["overlap_on_vs_off"]["available"] is False and "one data-parallel rank" in \
        res["overlap_on_vs_off"]["reason"]
    features = res["runs"]["unfused"]["features"]  # what the training process reported having on
    assert (features["overlap_grad_reduce"], features["overlap_param_gather"], features["ddp_bucket_size"]) == \
        (False, False, None)
    assert features["causal_mask"] == ["its own causal mode (no [S, S] mask per layer)"]
    assert features["grad_norm"].startswith("on the device")

    # the figures follow from the training process's own step times, warm-up iterations dropped
    run = res["runs"]["unfused"]
    logged = _metrics(tmp_path / "logs" / "metrics-unfused.jsonl")
    assert [r["iteration"] for r in logged] == list(range(1, 9))
    after_warmup = [r["step_time_s"] for r in logged if r["iteration"] > 3]
    assert run["step_times_s"] == after_warmup and run["measured_iterations"] == [4, 5, 6, 7, 8]
    assert run["step_time_s"] == statistics.median(after_warmup)
    tokens = 1 * 256 / statistics.median(after_warmup)
    assert run["tokens_per_sec_per_device"] == pytest.approx(tokens, rel=1e-12)
    flops = hand_training_flops_per_token(64, 176, 4, 8, 4, 1000, 256)
    assert res["flops_per_token"] == flops
    assert run["tflops_per_device"] == pytest.approx(tokens * flops / 1e12, rel=1e-12)
    assert run["mfu"] is None
    assert run["peak_memory_kind"] == "host max RSS" and 0.05 < run["peak_memory_gb"] < 20
    assert run["peak_memory_gb"] == max(r["memory"]["max_rss_gb"] for r in logged if r["iteration"] > 3)
    # the run's table row
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| CPU"))
    assert f"| {round(tokens)} " in row and "| unfused " in row and "| n/a " in row


def test_narrower_depth_longer_sequence_and_two_processes(tmp_path):
    """--num-layers keeps the width and builds the model from flags (--vocab-size, no tokenizer); a --seq-length
    past the model's positions raises them; --nproc 2 runs torchrun (data parallel), figures per device."""
    out = tmp_path / "r.json"
    proc = _cli("--model", "aquila2-tiny", "--num-layers", 2, "--seq-length", 320, "--nproc", 2, "--warmup", 1,
                "--iters", 2, "--device-peak-tflops", 0.5, "--label", "box", "--output", out, "--log-dir",
                tmp_path / "logs", "--fused", "both", "--", "--use-distributed-optimizer")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    st, run = res["settings"], res["runs"]["unfused"]
    assert (st["num_layers"], st["hidden_size"], st["ffn_hidden_size"], st["num_query_groups"]) == (2, 64, 176, 4)
    assert (st["seq_length"], st["architecture"]["max_position_embeddings"], st["vocab_size"]) == (320, 320, 1000)
    assert (st["data_parallel_size"], st["global_batch_size"]) == (2, 2)
    assert "--vocab-size 1000" in run["command"] and "--model" not in run["command"]
    assert "--nproc-per-node 2" in run["command"]
    log = (tmp_path / "logs" / "train-unfused.log").read_text()
    # 2 layers x (q,o 64x64; k,v 64x32; gate,up,down 64x176; 2 norms) + 2 x 1000x64 + final norm
    assert "220,480 parameters" in log and "tp1 pp1 dp2" in log
    step = statistics.median(r["step_time_s"] for r in _metrics(tmp_path / "logs" / "metrics-unfused.jsonl")
                             if r["iteration"] > 1)
    tokens = 2 * 320 / step / 2  # global batch x seq / step / devices
    assert run["tokens_per_sec_per_device"] == pytest.approx(tokens, rel=1e-12)
    flops = hand_training_flops_per_token(64, 176, 2, 8, 4, 1000, 320)
    assert run["mfu"] == pytest.approx(tokens * flops / 1e12 / 0.5, rel=1e-12)
    assert res["device"]["peak_source"] == "--device-peak-tflops"
    assert res["label"] == "CPU: box"  # a CPU result keeps saying so
    # two data-parallel ranks: the plain run again with Megatron's communication overlap on, and the ratio
    ov = res["overlap_on_vs_off"]
    toggled = ov["toggled_run"]
    assert "--overlap-grad-reduce --overlap-param-gather" in toggled["command"]
    assert toggled["features"]["overlap_grad_reduce"] and toggled["features"]["overlap_param_gather"]
    assert not run["features"]["overlap_grad_reduce"] and run["features"]["use_distributed_optimizer"]
    assert ov["available"] and ov["throughput_ratio"] == pytest.approx(
        toggled["tokens_per_sec_per_device"] / run["tokens_per_sec_per_device"], rel=1e-12)
    assert "communication overlap on / off throughput" in proc.stdout


# ------------------------------------------------------------------------------------------------------ compare
def _result(label, tokens, step, *, fused=None, model="aquila2-7b", seq=2048, cpu=False, mfu=None, mem=30.0):
    run = {"step_times_s": [step] * 5, "step_time_s": step, "tokens_per_sec_per_device": tokens,
           "tflops_per_device": tokens * 47.3e9 / 1e12, "mfu": mfu, "peak_memory_gb": mem}
    runs = {"unfused": run}
    fv = None
    if fused is not None:
        runs["fused"] = dict(run, tokens_per_sec_per_device=fused, step_time_s=step * tokens / fused,
                             tflops_per_device=fused * 47.3e9 / 1e12)
        fv = {"available": True, "throughput_ratio": fused / tokens}
    return {"schema": "aquila_npu.benchmark/1", "label": label,
            "device": {"kind": "cpu" if cpu else "npu", "name": label, "label": label, "count": 8, "is_cpu": cpu},
            "settings": {"architecture": {"name": model}, "seq_length": seq, "global_batch_size": 64,
                         "dtype": "fp16", "tensor_model_parallel_size": 8, "pipeline_model_parallel_size": 1,
                         "data_parallel_size": 1},
            "runs": runs, "fused_vs_unfused": fv}


def _table_rows(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_compare_prints_the_table_with_ratios_to_the_first(tmp_path, capsys):
    # ModelLink's published Aquila2-7B figures: NPU 3323 tokens/p/s (4.93 s/step) vs reference GPU 2673 (6.13)
    a, b = tmp_path / "npu.json", tmp_path / "gpu.json"
    a.write_text(json.dumps(_result("Ascend910B2", 3323, 4.93, mfu=0.5)))
    b.write_text(json.dumps(_result("NVIDIA A100-SXM4-80GB", 2673, 6.13, fused=3000)))
    rc, out, err = _main(capsys, "--compare", a, b)
    assert rc == 0, err
    rows = _table_rows(out)
    assert [(r["Device"], r["Kernels"]) for r in rows] == [
        ("8 x Ascend910B2", "unfused"), ("8 x NVIDIA A100-SXM4-80GB", "unfused"), ("8 x NVIDIA A100-SXM4-80GB", "fused")]
    assert [r["tokens/p/s"] for r in rows] == ["3323", "2673", "3000"]
    assert [r["s/step"] for r in rows] == ["4.93", "6.13", "5.46"]
    assert [r["vs first"] for r in rows] == ["1.00x", "0.80x", "0.90x"]  # 2673/3323, 3000/3323
    assert rows[0]["MFU"] == "50.0%" and rows[1]["MFU"] == "n/a"
    assert rows[0]["TFLOP/s/device"] == "157" and rows[0]["Iters"] == "5"
    assert "fused / unfused throughput 1.12x" in out  # 3000 / 2673
    assert "CPU figures" not in out and "rows differ" not in out


def test_compare_marks_cpu_rows_and_different_models(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_result("CPU: x", 800, 0.3, model="aquila2-tiny", seq=256, cpu=True)))
    b.write_text(json.dumps(_result("NVIDIA H100 80GB HBM3", 40000, 0.8)))
    rc, out, err = _main(capsys, "--compare", a, b)
    assert rc == 0, err
    assert [r["vs first"] for r in _table_rows(out)] == ["1.00x", "50.00x"]
    assert "CPU figures" in out and "rows differ in model or sequence length" in out


def test_committed_cpu_result_is_a_labelled_cpu_result(capsys):
    results = sorted((ROOT / "benchmarks" / "results").glob("cpu-*.json"))
    assert results, "benchmarks/results/ holds no CPU result"
    rc, out, err = _main(capsys, "--compare", *results)
    assert rc == 0, err
    for path in results:
        res = json.loads(path.read_text())
        assert res["device"]["is_cpu"] and res["label"].startswith("CPU") and res["device"]["peak_tflops"] is None
    assert "CPU figures" in out


def test_plot_writes_a_png_or_names_the_missing_package(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps(_result("Ascend910B2", 3323, 4.93, fused=3500)))
    png = tmp_path / "out" / "cmp.png"
    proc = _cli("--compare", a, a, "--plot", png)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert proc.returncode == 2 and "matplotlib" in proc.stderr and "pip install matplotlib" in proc.stderr
        assert not png.exists()
        pytest.skip("matplotlib is not installed: checked the error that names it")
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


# ------------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("args,needle,code", [
    (["--compare", "missing.json"], "missing.json: no such file", 2),
    (["--model", "aquila9-1b", "--iters", 1], "unknown model", 2),
    (["--iters", 0], "--iters must be >= 1", 2),
    (["--nproc", 3, "--tp", 2], "not a multiple", 2),
    (["--fused-switches", "rmsnorm,warp"], "choose from", 2),
    (["--fused", "on", "--iters", 1], "the cpu device has no fused kernels", 2),
    (["--device", "cuda"], "torch sees no CUDA GPU", 2),
])
def test_bad_input_is_a_clear_error(tmp_path, capsys, args, needle, code):
    rc, _, err = _main(capsys, *args, cwd=tmp_path)
    assert rc == code, (rc, err[-2000:])
    assert needle in err
    assert not (tmp_path / "benchmarks").exists()


def test_compare_rejects_files_that_are_not_results(tmp_path, capsys):
    bad_json, other = tmp_path / "bad.json", tmp_path / "other.json"
    bad_json.write_text("{not json")
    other.write_text(json.dumps({"iteration": 1}))
    for path, needle in ((bad_json, "not JSON"), (other, "not a benchmark result")):
        rc, _, err = _main(capsys, "--compare", path)
        assert rc == 2 and needle in err, err


def test_a_failing_training_run_shows_its_error(tmp_path, capsys):
    # flags after -- go to aquila_npu.pretrain unchanged; here one it rejects next to the benchmark's --fp16
    rc, _, err = _main(capsys, "--iters", 1, "--warmup", 0, "--dtype", "fp16", "--output", tmp_path / "r.json",
                       "--", "--bf16", cwd=tmp_path)
    assert rc == 1
    assert "the unfused training run exited with status 2" in err
    assert "--bf16 and --fp16 exclude each other" in err  # the training process's own message
    assert not (tmp_path / "r.json").exists()


def test_timeout_stops_the_training_run(tmp_path, capsys):
    t = time.monotonic()
    rc, _, err = _main(capsys, "--iters", 1000, "--timeout", 2, "--output", tmp_path / "r.json", cwd=tmp_path)
    assert rc == 1 and "passed --timeout 2s and was stopped" in err
    assert time.monotonic() - t < 60 and not (tmp_path / "r.json").exists()


def test_help_documents_every_flag():
    from aquila_npu.cli.benchmark import build_parser

    assert_help_documents_every_flag(build_parser())


# ------------------------------------------------------------------------------------------- pretrain --vocab-size
def test_pretrain_vocab_size_flag_builds_models_from_flags_without_a_tokenizer():
    from aquila_npu.cli.pretrain import parse
    from aquila_npu.errors import UsageError
    from aquila_npu.training.config import architecture

    common = ["--mock-data", "--train-iters", "1"]
    shape = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "176", "--num-attention-heads", "8"]
    spec = architecture(parse([*common, *shape, "--vocab-size", "1000"]), None, None)
    assert (spec.vocab_size, spec.num_layers, spec.hidden_size, spec.source) == (1000, 2, 64, "flags")
    with pytest.raises(UsageError, match="--vocab-size or --tokenizer-name-or-path"):
        architecture(parse([*common, *shape]), None, None)
    # with a tokenizer the model's vocabulary may be larger (padding rows), not smaller
    spec = architecture(parse([*common, *shape, "--vocab-size", "1000"]), None, 900)
    assert spec.vocab_size == 1000
    with pytest.raises(UsageError, match="more than the model's vocabulary"):
        architecture(parse([*common, *shape, "--vocab-size", "800"]), None, 900)
    # with --model it must agree, like every architecture flag
    assert architecture(parse([*common, "--model", "aquila2-tiny", "--vocab-size", "1000"]), None, None).name == \
        "aquila2-tiny"
    with pytest.raises(UsageError, match=r"--vocab-size 999 \(--model aquila2-tiny: 1000\)"):
        architecture(parse([*common, "--model", "aquila2-tiny", "--vocab-size", "999"]), None, None)
