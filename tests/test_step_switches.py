"""Issue 28: the training-step switches a stock torch allows change no loss (the chunked loss over the vocabulary,
torch.compile of the elementwise regions), are refused in one line where they cannot run, and the step profile
accounts for an iteration's time. The references: megatron-core's own loss (output layer +
``vocab_parallel_cross_entropy``) and torch's ``cross_entropy``."""

import json
import os
import sys

import pytest
import torch

from helpers import (ROOT, TRAIN_SEQ, SyncCounter, adam_steps, assert_one_line_error, child_env, fake_npu_env,
                     read_metrics, run_module, torchrun, trainer)

from aquila_npu.errors import UsageError

SEQ = TRAIN_SEQ
# Tolerances, recorded (docs/benchmark.md): the chunked loss and the compiled regions against the plain path.
FP32_REL = 2e-5  # losses and gradient norms of 3 steps, fp32
BF16_REL = 1e-2  # the same in bf16 (bf16 keeps 8 bits of mantissa: ~4e-3 per rounding)


def _losses(step, n=3):
    return [(out["lm_loss"], out["grad_norm"]) for out in (step() for _ in range(n))]


def _close(a, b, rel):
    assert len(a) == len(b)
    for (la, ga), (lb, gb) in zip(a, b):
        assert abs(la - lb) <= rel * abs(lb) and abs(ga - gb) <= rel * abs(gb), (a, b)


# ------------------------------------------------------------------------------------------ the chunked loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_is_torchs_loss_and_gradients(dtype):
    """Per-token losses and d(hidden), d(weight) of ``sum(loss * mask) * scale`` against torch's cross_entropy on
    the full logits; chunks that do not divide the tokens, a masked token, a loss scale."""
    from aquila_npu.models.chunked_loss import ChunkedLinearCrossEntropy

    g = torch.Generator().manual_seed(0)
    n, h, v = 37, 24, 101
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.3).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    mask = torch.ones(n)
    mask[[3, 20]] = 0.0
    scale = 3.0

    ref_h, ref_w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy((ref_h @ ref_w.t()).float(), labels, reduction="none")
    ((ref * mask).sum() * scale).backward()
    loss = ChunkedLinearCrossEntropy.apply(hidden, weight, labels, mask, 8, None, 0)
    ((loss * mask).sum() * scale).backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(loss, ref.detach(), **tol)
    torch.testing.assert_close(hidden.grad.float(), ref_h.grad.float(), **tol)
    torch.testing.assert_close(weight.grad.float(), ref_w.grad.float(), **tol)


def test_chunked_loss_trains_as_megatron_cores_loss(cpu_device):
    """Three steps of aquila2-tiny (2 micro-batches per step): losses and gradient norms of --loss-chunk-size 7 (a
    chunk that divides nothing) equal megatron-core's loss in fp32 (FP32_REL) and bf16 (BF16_REL)."""
    plain = _losses(trainer(cpu_device, 2)[0])
    chunked = _losses(trainer(cpu_device, 2, "--loss-chunk-size", "7")[0])
    _close(chunked, plain, FP32_REL)
    plain16 = _losses(trainer(cpu_device, 2, "--bf16")[0])
    chunked16 = _losses(trainer(cpu_device, 2, "--bf16", "--loss-chunk-size", "16")[0])
    _close(chunked16, plain16, BF16_REL)


def test_chunked_loss_leaves_evaluation_to_megatron_core(cpu_device):
    from aquila_npu.models.chunked_loss import ChunkedLossGPTModel

    step, model, _, cfg = trainer(cpu_device, 2, "--loss-chunk-size", "5")
    assert isinstance(model.module, ChunkedLossGPTModel)
    model.eval()
    tokens = torch.randint(0, 100, (1, SEQ))
    pos = torch.arange(SEQ).unsqueeze(0)
    with torch.no_grad():
        logits = model(tokens, pos, None)  # no labels: megatron-core's logits
    assert logits.shape == (1, SEQ, cfg.layout.padded_vocab)


@pytest.mark.slow
def test_chunked_loss_over_vocabulary_shards_equals_megatron_cores(tmp_path):
    """tp2 (the vocabulary split over two ranks: the chunks' max, sum and target all-reduced), with and without
    sequence parallelism: the losses and gradient norms of megatron-core's vocab-parallel loss (FP32_REL)."""
    common = ["--model", "aquila2-tiny", "--mock-data", "--train-iters", "3", "--seq-length", str(SEQ),
              "--micro-batch-size", "1", "--global-batch-size", "2", "--tensor-model-parallel-size", "2",
              "--device", "cpu", "--lr", "1e-3"]
    runs = {}
    for name, extra in (("plain", []), ("chunked", ["--loss-chunk-size", "12"]),
                        ("chunked-sp", ["--loss-chunk-size", "12", "--sequence-parallel"])):
        metrics = tmp_path / f"{name}.jsonl"
        torchrun("-m aquila_npu.pretrain", 2, [*common, *extra, "--metrics-file", metrics])
        runs[name] = list(zip(read_metrics(metrics), read_metrics(metrics, "grad_norm")))
    assert len(runs["plain"]) == 3
    _close(runs["chunked"], runs["plain"], FP32_REL)
    _close(runs["chunked-sp"], runs["plain"], FP32_REL)


# ------------------------------------------------------------------------------------------ torch.compile


def test_compiled_elementwise_regions_train_as_the_plain_modules(cpu_device):
    """--compile-elementwise (inductor's C++ backend on this CPU): the same losses and gradient norms in fp32."""
    from aquila_npu.device.compiled import CompiledRMSNorm

    plain = _losses(trainer(cpu_device, 2)[0], 2)
    step, model, _, _ = trainer(cpu_device, 2, "--compile-elementwise")
    assert any(isinstance(m, CompiledRMSNorm) for m in model.modules())
    assert model.module.config.bias_activation_fusion and model.module.config.bias_dropout_fusion
    _close(_losses(step, 2), plain, FP32_REL)


# ------------------------------------------------------------------------------------------ no host syncs


def test_no_step_syncs_reads_nothing_on_the_host_and_trains_the_same(cpu_device):
    """--no-step-syncs: the step itself reads no device value on the host (the plain step reads three: megatron-core's
    token count and gradient norm, and the logged loss); losses and gradient norms as the plain step's (FP32_REL),
    with gradient clipping active (norms above --clip-grad 1.0 at the start)."""
    from aquila_npu.training.step import host_values

    step, _, optimizer, _ = trainer(cpu_device, 2)
    plain = _losses(step)
    with SyncCounter(adam_steps(optimizer)) as reads:
        step()
    assert reads.total >= 3, reads.calls
    # (the sync-free optimizer stays installed until the module's cpu_device fixture undoes the journal)
    step, _, optimizer, _ = trainer(cpu_device, 2, "--no-step-syncs")
    outs = [step(sync=False) for _ in range(3)]
    with SyncCounter(adam_steps(optimizer)) as reads:
        out = step(sync=False)
    assert reads.total == 0, reads.calls
    assert isinstance(out["lm_loss"], torch.Tensor) and isinstance(out["grad_norm"], torch.Tensor)
    quiet = [(o["lm_loss"], o["grad_norm"]) for o in map(host_values, outs)]
    assert max(g for _, g in plain) > 1.0  # clipping took part
    _close(quiet, plain, FP32_REL)


# ------------------------------------------------------------------------------------------ refusals, NPU


def test_switch_flags_are_checked_before_any_work():
    from aquila_npu.cli.pretrain import parse
    from aquila_npu.training import speed

    base = ["--model", "aquila2-tiny", "--mock-data", "--train-iters", "1"]
    with pytest.raises(UsageError, match="--loss-chunk-size -1 must be >= 0"):
        parse([*base, "--loss-chunk-size", "-1"])
    with pytest.raises(UsageError, match="--profile-step needs --profile-breakdown"):
        parse([*base, "--profile-step", "2"])
    with pytest.raises(UsageError, match="--no-step-syncs and --fp16 exclude each other"):
        parse([*base, "--no-step-syncs", "--fp16"])
    args = parse([*base, "--compile-elementwise", "--loss-chunk-size", "64", "--no-step-syncs"])
    switches = speed.StepSwitches.from_args(args)
    assert switches.requested() == ["--loss-chunk-size=64", "--compile-elementwise", "--no-step-syncs"]
    with pytest.raises(UsageError, match="torch.compile has no Ascend backend") as e:
        speed.check_device(switches, "npu")
    assert "\n" not in str(e.value)
    speed.check_device(speed.StepSwitches(loss_chunk_size=64), "npu")  # the chunked loss is real on npu
    with pytest.raises(UsageError, match="torch.profiler does not see NPU kernels"):
        speed.check_device(speed.StepSwitches(), "npu", profile=True)


def test_on_the_fake_npu_runtime_the_chunked_loss_trains_and_compile_is_refused(tmp_path):
    """--device npu on the fake torch_npu runtime: the chunked loss and the sync-free step run (plain torch ops on
    the npu device), --compile-elementwise exits 2 with one line."""
    common = ["--model", "aquila2-tiny", "--mock-data", "--train-iters", "2", "--seq-length", "32", "--device", "npu",
              "--micro-batch-size", "1", "--global-batch-size", "2"]
    env = fake_npu_env(AQUILA_FAKE_NPU_DEVICES=1)
    metrics = tmp_path / "m.jsonl"
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "aquila_npu.pretrain", *common, "--loss-chunk-size", "16",
                           "--no-step-syncs", "--metrics-file", str(metrics)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [json.loads(line)["lm_loss"] for line in metrics.read_text().splitlines() if "lm_loss" in line]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
    proc = subprocess.run([sys.executable, "-m", "aquila_npu.pretrain", *common, "--compile-elementwise"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "torch.compile has no Ascend backend" in proc.stderr
    assert_one_line_error(proc.stderr)


# ------------------------------------------------------------------------------------------ the step profile


def test_classify_puts_gpu_and_cpu_operators_in_their_groups():
    from aquila_npu.training.profile import classify

    v = 100352
    assert classify(["aten::mm", "autograd::engine::evaluate_function: mmbackward0"], [[4096, 4096], [4096, 11008]],
                    v) == "gemm"
    assert classify(["aten::mm"], [[4096, 4096], [4096, v]], v) == "output_and_loss"
    assert classify(["aten::_flash_attention_forward", "aten::_scaled_dot_product_flash_attention"], [], v) == \
        "attention"
    assert classify(["aten::mul", "scaleddotproductflashattentionforcpubackward0"], [], v) == "attention"
    assert classify(["aten::_foreach_add_", "optimizer.step#adamw.step", "aquila:optimizer"], [], v) == "optimizer"
    assert classify(["aten::add_", "autograd::engine::evaluate_function: torch::autograd::accumulategrad"],
                    [[v, 4096]], v) == "other"
    assert classify(["aten::embedding_dense_backward"], [[4096, 1], [v, 4096]], v) == "other"
    assert classify(["aten::mul", "aten::silu"], [[4096, 11008]], v) == "elementwise"
    assert classify(["aten::exp", "aquila:loss"], [], v) == "output_and_loss"


def test_profile_of_a_cpu_step_accounts_for_its_time(cpu_device, tmp_path):
    from aquila_npu.flops import training_flops_breakdown, training_flops_per_token
    from aquila_npu.training.profile import GROUPS, StepProfile, load, table

    step, _, _, cfg = trainer(cpu_device, 2)
    step()
    path = tmp_path / "profile.json"
    flops = training_flops_breakdown(cfg.spec, SEQ, cfg.layout.padded_vocab)
    assert sum(flops.values()) == pytest.approx(training_flops_per_token(cfg.spec, SEQ, cfg.layout.padded_vocab))
    prof = StepProfile(str(path), 2, "cpu", cfg.layout.padded_vocab, flops, 2 * SEQ, True, meta={"model": "tiny"})
    prof.begin(2)
    step()
    prof.end(2)
    doc = load(path)
    assert set(doc["seconds"]) == set(GROUPS)
    for group in ("gemm", "attention", "elementwise", "output_and_loss", "optimizer"):
        assert doc["seconds"][group] > 0, (group, doc["seconds"])
    assert sum(doc["seconds"].values()) == pytest.approx(doc["wall_s"], rel=1e-6)
    assert sum(doc["shares"].values()) == pytest.approx(1.0)
    assert "output layer + cross-entropy" in table(doc) and doc["model"] == "tiny"


def test_benchmark_prints_the_profile_and_both_mfu_formulas(tmp_path):
    out = tmp_path / "b.json"
    proc = run_module("aquila_npu.benchmark", "--model", "aquila2-tiny", "--warmup", "1", "--iters", "2",
                      "--device", "cpu", "--profile", "--device-peak-tflops", "1", "--output", out,
                      "--", "--seq-length", "64", "--loss-chunk-size", "32", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unfused: ours" in proc.stdout and "FlagPerf's" in proc.stdout
    assert "where iteration 1's time goes" in proc.stdout and "host gaps" in proc.stdout
    result = json.loads(out.read_text())
    run = result["runs"]["unfused"]
    assert run["profile"]["iteration"] == 1 and run["mfu_flagperf"] > 0
    params = result["settings"]["parameters"]
    assert result["flagperf_flops_per_token"] == 6.0 * params
    assert run["mfu_flagperf"] == pytest.approx(run["tokens_per_sec_per_device"] * 6.0 * params / 1e12)


# ------------------------------------------------------------------------------------------ benchmarks/cuda_check.py


@pytest.mark.slow
def test_cuda_check_runs_every_variant_on_a_tiny_cpu_model(tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cuda_check.py"), "--out-dir", str(tmp_path),
                           "--tiny", "--device", "cpu", "--variants", "plain,chunked-loss"],
                          env=child_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "cuda_check.json").read_text())
    variants = doc["variants"]
    assert [v["name"] for v in variants] == ["plain", "chunked-loss"]
    assert variants[0]["ratio_vs_plain"] == 1.0 and variants[1]["ratio_vs_plain"] > 0
    assert variants[0]["profile"]["seconds"]["gemm"] > 0
    assert os.path.exists(tmp_path / "cuda_check.json") and "ratio vs plain" in proc.stdout


def test_inference_benchmarks_give_ranges_over_rounds_and_one_file_per_shape():
    from aquila_npu.benchmarking.side_by_side import BENCH_SHAPES, ratio_range, shape_out

    assert ratio_range([1.21, 1.4, 1.3]) == "1.21-1.40x (3 rounds)" and ratio_range([1.3]) == "1.30x"
    assert shape_out("r/gen.json", "tinyllama-1.1b", True) == "r/gen-tinyllama-1.1b.json"
    assert shape_out("r/gen.json", "tinyllama-1.1b", False) == "r/gen.json" and shape_out(None, "x", True) is None
    tiny_llama = BENCH_SHAPES["tinyllama-1.1b"]  # a real checkpoint's shape with its own vocabulary
    output_share = tiny_llama.hidden_size * tiny_llama.vocab_size / tiny_llama.num_parameters()
    assert 0.05 < output_share < 0.07 and 1.0e9 < tiny_llama.num_parameters() < 1.2e9
