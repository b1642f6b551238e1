"""Generation from converted checkpoints vs Hugging Face transformers' ``generate`` on the same tiny random model.

The references run in this process on a model built from its config (``tiny_llama``, the weights that were saved
and converted): never ``from_pretrained`` here (see DEVELOPERS.md). Our side runs under torchrun.
"""

import json
import subprocess
import sys

import pytest
import torch

from aquila_npu.testing.tiny_hf import tiny_llama
from helpers import (ROOT, assert_help_documents_every_flag, build_assets, call_main, child_env, stub_torchrun_argv,
                     torchrun)

PROMPTS = ["kalo mi taren", "北京是中国的首都，今天天气很好", "ber fy ost ung dar el quin vex po shu ta"]
N_NEW = 20


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(str(tmp_path_factory.mktemp("gen")))


def hf_greedy(tokenizer, prompts, max_new_tokens, eos_token_id=None):
    """HF generate, greedy, the prompts batched with left padding and an attention mask: generated ids per prompt,
    cut after the EOS (HF pads finished rows)."""
    model = tiny_llama()
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    rows = []
    for r in out[:, enc.input_ids.shape[1]:].tolist():
        if eos_token_id is not None and eos_token_id in r:
            r = r[:r.index(eos_token_id) + 1]
        rows.append(r)
    return rows


def _run(assets, tmp_path, tp, pp, *flags):
    out = tmp_path / f"out-{tp}{pp}.jsonl"
    proc = torchrun("-m aquila_npu.generate", tp * pp,
                    ["--load", assets[tp, pp], "--tokenizer-name-or-path", assets["hf"], "--max-new-tokens", N_NEW,
                     *[a for p in PROMPTS for a in ("--prompt", p)], "--output", out, *flags])
    return proc, out


def _tokenizer(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets["hf"])


@pytest.mark.slow
def test_greedy_tp2_pp2_batched_matches_hf_generate_token_for_token(assets, tmp_path):
    tok = _tokenizer(assets)
    free = hf_greedy(tok, PROMPTS, N_NEW)
    # An EOS that the second prompt reaches after a few tokens: that row must stop there, the others go on.
    eos = next(t for j, t in enumerate(free[1]) if j >= 3 and t not in free[1][:j])
    ref = hf_greedy(tok, PROMPTS, N_NEW, eos_token_id=eos)
    assert ref[1][-1] == eos and len(ref[1]) < N_NEW
    proc, out = _run(assets, tmp_path, 2, 2, "--greedy", "--micro-batch-size", 3, "--eos-token-id", eos)
    rows = [json.loads(line) for line in open(out, encoding="utf-8")]
    assert [r["prompt"] for r in rows] == PROMPTS
    # token_ids are the generated ids without the EOS that ended them; HF's rows end with it
    assert [r["token_ids"] + ([eos] if r["finish_reason"] == "eos" else []) for r in rows] == ref
    assert [r["finish_reason"] for r in rows] == ["eos" if eos in r else "length" for r in ref]
    assert "length" in [r["finish_reason"] for r in rows]
    for r in rows:
        assert r["text"] == tok.decode(r["token_ids"], skip_special_tokens=True)
        assert r["text"] in proc.stdout  # rank 0 printed it


def test_tp1_pp1_recompute_and_top_k_1_sampling_match_hf_greedy(assets, tmp_path):
    """One process, no KV cache (full recompute) and sampling reduced to greedy by top-k 1, one prompt at a time
    (streamed to the console)."""
    tok = _tokenizer(assets)
    ref = hf_greedy(tok, PROMPTS, N_NEW)
    proc, out = _run(assets, tmp_path, 1, 1, "--no-kv-cache", "--top-k", 1, "--temperature", 0.7)
    rows = [json.loads(line) for line in open(out, encoding="utf-8")]
    assert [r["token_ids"] for r in rows] == ref
    assert rows[1]["text"] in proc.stdout  # streamed text, Chinese included


NPU_WORKER = """
import json, sys
from aquila_npu.checkpoint.load_model import load_model_for_inference
from aquila_npu.checkpoint.megatron_io import CheckpointInfo
from aquila_npu.device.backends import FusedOps
from aquila_npu.device.setup import setup
from aquila_npu.inference.generation import TextGenerator
from aquila_npu.testing import npu_emulator
load, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
with npu_emulator.installed() as fake:
    dev = setup("cpu", FusedOps.all(), kernels="npu")
    gen = TextGenerator.from_loaded(load_model_for_inference(CheckpointInfo.read(load), dev), dev.torch_device)
    print(json.dumps({"ids": [g.token_ids for g in gen.generate(prompts, n)], "calls": dict(fake.calls)}))
"""


def test_ascend_fused_kernels_through_emulator_match_hf(assets):
    """The NPU backend (fused RMSNorm, flash attention with the KV cache, fused RoPE, SwiGLU; torch_npu emulated on
    the CPU) generates HF's greedy tokens."""
    tok = _tokenizer(assets)
    ref = hf_greedy(tok, PROMPTS, N_NEW)
    env = child_env()
    proc = subprocess.run([sys.executable, "-c", NPU_WORKER, assets[1, 1], json.dumps([tok.encode(p) for p in PROMPTS]),
                           str(N_NEW)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ids"] == ref
    for op in ("npu_rms_norm", "npu_fusion_attention", "npu_rotary_mul", "npu_swiglu"):
        assert out["calls"].get(op, 0) > 0, op


def test_chat_templates_are_flagai_prompts():
    from aquila_npu.inference.chat import chat_prompt, default_template
    from aquila_npu.models.registry import get_model_spec

    s = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
         "detailed, and polite answers to the human's questions.")
    # FlagAI predict(): conv.get_prompt() + " "
    assert chat_prompt("aquila-v1", "你好") == "<|startofpiece|>你好<|endofpiece|> "
    assert chat_prompt("aquila-legacy", "Hi") == s + "\n\n### Human: Hi\n### Assistant:  "
    assert chat_prompt("aquila", "Hi") == s + "###Human: Hi###Assistant: "
    assert chat_prompt("aquila-chat", "Hi", system="S") == "S###Human: Hi###Assistant: "
    assert default_template(get_model_spec("aquilachat2-7b")) == "aquila-v1"
    assert default_template(get_model_spec("aquilachat2-34b")) == "aquila-legacy"
    assert default_template(get_model_spec("aquilachat2-34b-16k")) == "aquila"


def test_sampling_filters_like_hf_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from aquila_npu.inference.sampling import SamplingParams, filter_logits

    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    p = SamplingParams(greedy=False, temperature=0.7, top_k=10, top_p=0.8)
    ref = logits
    for w in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(10), TopPLogitsWarper(0.8)):
        ref = w(None, ref)
    ours = filter_logits(logits, p)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert torch.allclose(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)])


def _fails(args, capsys):
    from aquila_npu.cli.generate import main

    return call_main(main, args, capsys)


def test_bad_inputs_are_one_line_errors(assets, tmp_path, capsys):
    base = ["--tokenizer-name-or-path", assets["hf"], "--prompt", "x"]
    rc, err = _fails(["--load", tmp_path / "missing", *base], capsys)
    assert rc == 2 and "--load" in err and "no such directory" in err
    rc, err = _fails(["--load", assets[1, 1], "--tokenizer-name-or-path", tmp_path / "no", "--prompt", "x"], capsys)
    assert rc == 2 and "--tokenizer-name-or-path" in err
    rc, err = _fails(["--load", assets[1, 1], *base, "--num-layers", 32, "--hidden-size", 64], capsys)
    assert rc == 2 and "--num-layers 32 (checkpoint: 4)" in err and "--hidden-size" not in err
    rc, err = _fails(["--load", assets[2, 2], *base], capsys)  # 1 process, tp2-pp2 weights
    assert rc == 2 and "tp2-pp2" in err and "--nproc-per-node 4" in err and "convert_ckpt.py" in err
    rc, err = _fails(["--load", assets[1, 1], *base, "--tensor-model-parallel-size", 2], capsys)
    assert rc == 2 and "--target-tensor-parallel-size 2" in err
    rc, err = _fails(["--load", assets[1, 1], *base, "--greedy", "--top-p", 0.9], capsys)
    assert rc == 2 and "--greedy cannot be combined with --top-p" in err
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": 3}\n')
    rc, err = _fails(["--load", assets[1, 1], "--tokenizer-name-or-path", assets["hf"], "--prompts-file", bad],
                     capsys)
    assert rc == 2 and "line 2" in err


def test_help_documents_every_flag():
    from aquila_npu.cli.generate import build_parser

    assert_help_documents_every_flag(build_parser())


# ------------------------------------------------------------------------------------------------------ scripts
SCRIPTS = {"generate_aquila2_7b_ptd.sh": ("aquila_npu.generate", "aquila2-7b", 8, 1),
           "generate_aquila2_34b_ptd.sh": ("aquila_npu.generate", "aquila2-34b", 8, 2),
           "evaluate_aquila2_7b_ptd.sh": ("aquila_npu.evaluate", "aquila2-7b", 8, 1),
           "evaluate_aquila2_34b_ptd.sh": ("aquila_npu.evaluate", "aquila2-34b", 8, 2)}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_example_script_flags_parse_and_describe_the_model(script, tmp_path):
    """bash -n passes; run with a stand-in torchrun that records its arguments, the flags parse with the real
    parser and the architecture flags agree with the published model."""
    import importlib

    from aquila_npu.models import arch_flags
    from aquila_npu.models.registry import get_model_spec

    path = ROOT / "examples" / "aquila2" / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    launcher, launched, argv = stub_torchrun_argv(path, tmp_path)
    module, model, tp, pp = SCRIPTS[script]
    assert launched == module
    args = importlib.import_module(module.replace("aquila_npu.", "aquila_npu.cli.")).build_parser().parse_args(argv)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (tp, pp)
    assert int(launcher["--nproc_per_node"]) * int(launcher["--nnodes"]) == tp * pp
    spec = get_model_spec(model)
    arch_flags.check(spec, arch_flags.given(args), "published model", padded_vocab=spec.vocab_size, tp=tp)
    if module == "aquila_npu.evaluate":
        assert (args.task, args.task_data_path, args.scoring) == ("boolq", "./boolq/test", "first-token")
    assert args.load.endswith(f"-tp{tp}-pp{pp}/")
