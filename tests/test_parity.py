"""Logits of our megatron-core model vs Hugging Face transformers' LlamaForCausalLM, same random weights.

fp32: max |diff| < 1e-4 at tp1-pp1 (one process) and tp2-pp2 (four gloo processes, torchrun).
bf16 (the fake torch_npu runtime's Ascend kernels, cuda): max |diff| < 2e-2 with logits of magnitude ~0.6, argmax agreement >= 90%.
"""

import pytest
import torch

from helpers import fake_npu_env, read_json, torchrun

WORKER = "-m aquila_npu.selfcheck"


def _run(tmp_path, nproc, *args, env=None):
    out = tmp_path / "parity.json"
    torchrun(WORKER, nproc, [*args, "--out", out], env=env)
    return read_json(out)


def test_tp1_pp1_cpu(tmp_path):
    r = _run(tmp_path, 1)
    assert r["kernels"] == "cpu" and r["max_abs_diff"] < 1e-4 and r["argmax_agree"] == 1.0
    assert r["padded_vocab"] == 1008  # 1003 padded to a multiple of 8


@pytest.mark.slow
def test_tp2_pp2_cpu_four_processes(tmp_path):
    r = _run(tmp_path, 4, "--tp", 2, "--pp", 2)
    assert (r["tp"], r["pp"]) == (2, 2)
    assert r["max_abs_diff"] < 1e-4 and r["argmax_agree"] == 1.0


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-4), ("bf16", 2e-2)])
def test_npu_backend_through_emulator(tmp_path, dtype, tol):
    r = _run(tmp_path, 1, "--device", "npu", "--dtype", dtype, env=fake_npu_env())
    assert r["kernels"] == "npu" and r["max_abs_diff"] < tol and r["argmax_agree"] >= 0.9
    calls = r["emulated_npu_calls"]
    for op in ("npu_rms_norm", "npu_rotary_mul", "npu_swiglu"):
        assert calls.get(op, 0) > 0, f"{op} was never called"
    # Logits in eval mode: attention is Ascend's inference kernel, which takes float16/bfloat16 with a head dim that
    # is a multiple of 16 (TINY's is 8): the plain path here; tests/test_npu_emulator.py and test_generate.py cover it
    assert "npu_fusion_attention" not in calls


@pytest.mark.slow
def test_npu_backend_tp2_pp2_through_emulator(tmp_path):
    r = _run(tmp_path, 4, "--device", "npu", "--tp", 2, "--pp", 2, env=fake_npu_env())
    assert r["max_abs_diff"] < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_bf16(tmp_path):
    r = _run(tmp_path, 1, "--device", "cuda", "--dtype", "bf16")
    assert r["max_abs_diff"] < 2e-2 and r["argmax_agree"] >= 0.9


def test_a_mismatch_ends_with_one_line_and_exit_status_1(tmp_path):
    """A converted checkpoint compared with another model's Hugging Face folder (same shape, other weights): the
    result is printed and written, and the command ends with 'check failed' and exit status 1."""
    import json
    import subprocess
    import sys

    from aquila_npu.checkpoint.convert import to_megatron
    from aquila_npu.checkpoint.hf_io import HFReader
    from aquila_npu.testing.tiny_hf import tiny_llama
    from helpers import assert_one_line_error, child_env

    tiny_llama(seed=0).save_pretrained(tmp_path / "hf")
    tiny_llama(seed=1).save_pretrained(tmp_path / "other")
    to_megatron(HFReader(str(tmp_path / "hf")), str(tmp_path / "mg"), 1, 1)
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "aquila_npu.selfcheck", "--device", "cpu", "--load", tmp_path / "mg",
                           "--hf-dir", tmp_path / "other", "--out", out], env=child_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "MISMATCH" in proc.stdout and not json.loads(out.read_text())["ok"]
    assert "selfcheck: check failed: max |logits - HF|" in proc.stderr
    assert_one_line_error(proc.stderr.replace("check failed:", "error:"))
