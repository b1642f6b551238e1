"""Generation from converted checkpoints vs Hugging Face transformers' ``generate`` on the same tiny random model.

The references run in this process on a model built from its config (``tiny_llama``, the weights that were saved
and converted): never ``from_pretrained`` here (see DEVELOPERS.md). Our side runs under torchrun.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from aquila_npu.testing.tiny_hf import TINY, tiny_llama
from helpers import (ROOT, assert_help_documents_every_flag, build_assets, call_main, fake_npu_env,
                     stub_torchrun_argv, torchrun)

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
import json, sys, torch
from aquila_npu.checkpoint.load_model import load_model_for_inference
from aquila_npu.checkpoint.megatron_io import CheckpointInfo
from aquila_npu.device.fused import FusedOps
from aquila_npu.device.setup import setup
from aquila_npu.inference.generation import TextGenerator
load, prompts, n, dtype = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), getattr(torch, sys.argv[4])
dev = setup("npu", FusedOps.all())  # the fake torch_npu runtime (fake_npu_env): Ascend's kernels, emulated
loaded = load_model_for_inference(CheckpointInfo.read(load), dev, params_dtype=dtype)
gen = TextGenerator.from_loaded(loaded, dev.torch_device)
ids = [g.token_ids for g in gen.generate(prompts, n)]
print(json.dumps({"ids": ids, "calls": dict(sys.modules["torch_npu"].calls)}))
"""
# Head dim 16 (TINY's is 8): npu_fused_infer_attention_score needs a multiple of 16 in float16/bfloat16
# (torch_npu _op_plugin_docs.py:8210).
SPEC16 = TINY.replace(hidden_size=128)


def _npu_generate(load, tok, dtype):
    proc = subprocess.run([sys.executable, "-c", NPU_WORKER, load, json.dumps([tok.encode(p) for p in PROMPTS]),
                           str(N_NEW), dtype], env=fake_npu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def assets16(assets, tmp_path_factory):
    """The tokenizer of ``assets`` with a TINY-shaped model of head dim 16, converted for one process."""
    from aquila_npu.checkpoint.convert import to_megatron
    from aquila_npu.checkpoint.hf_io import HFReader

    root = tmp_path_factory.mktemp("gen16")
    hf = root / "hf"
    shutil.copytree(assets["hf"], hf)
    tiny_llama(SPEC16).save_pretrained(hf)  # replaces the model, keeps the tokenizer
    to_megatron(HFReader(str(hf)), str(root / "mg"), 1, 1)
    return {"hf": str(hf), (1, 1): str(root / "mg")}


def test_ascend_fused_kernels_fp32_through_emulator_match_hf(assets):
    """fp32: fused RMSNorm, RoPE and SwiGLU (torch_npu emulated on the CPU) generate HF's greedy tokens exactly.
    Ascend's inference attention takes no fp32 (docs 8065), so attention runs the plain path; the training kernel
    never runs in generation."""
    tok = _tokenizer(assets)
    out = _npu_generate(assets[1, 1], tok, "float32")
    assert out["ids"] == hf_greedy(tok, PROMPTS, N_NEW)
    for op in ("npu_rms_norm", "npu_rotary_mul", "npu_swiglu"):
        assert out["calls"].get(op, 0) > 0, op
    assert "npu_fusion_attention" not in out["calls"] and "npu_fused_infer_attention_score" not in out["calls"]


def test_ascend_inference_attention_bf16_through_emulator_follows_hf_greedy(assets16):
    """bf16 with every fused kernel: the prompt and each decoding step through npu_fused_infer_attention_score
    (megatron-core's static KV cache), never npu_fusion_attention (training only, docs 1674).

    Compared with HF on the same weights: bf16 greedy paths of a random tiny model part at near-ties (HF bf16, our
    plain bf16 path and the fused one each pick differently there), so every token we generate is checked, on its
    own prefix, against HF's fp32 logits (teacher forcing): within bf16 noise (1e-2, logits of magnitude ~0.8) of the
    best one, which makes it HF's exact argmax wherever HF's top-2 margin exceeds that - most steps (asserted)."""
    tok = _tokenizer(assets16)
    out = _npu_generate(assets16[1, 1], tok, "bfloat16")
    assert out["calls"].get("npu_fused_infer_attention_score", 0) > 0 and "npu_fusion_attention" not in out["calls"]
    for op in ("npu_rms_norm", "npu_rotary_mul", "npu_swiglu"):
        assert out["calls"].get(op, 0) > 0, op
    model = tiny_llama(SPEC16)
    gaps, decisive = [], 0
    for prompt, ids in zip(PROMPTS, out["ids"]):
        prefix = tok.encode(prompt)
        assert len(ids) == N_NEW
        with torch.no_grad():
            logits = model(torch.tensor([prefix + ids])).logits[0, len(prefix) - 1:-1]
        for token, row in zip(ids, logits):
            top2 = row.topk(2).values
            gaps.append((row.max() - row[token]).item())
            decisive += (top2[0] - top2[1]).item() > 1e-2
    assert max(gaps) <= 1e-2, gaps
    assert decisive >= len(gaps) // 2, (decisive, len(gaps))


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


@pytest.mark.parametrize("name", ["prompts.txt", "prompts.jsonl"])
def test_a_prompts_file_that_is_not_utf8_is_one_line(tmp_path, capsys, name):
    """Issue 30: a UnicodeDecodeError traceback. Prompts are read before anything is loaded."""
    bad = tmp_path / name
    bad.write_bytes(b'{"prompt": "ok"}\n' + "caf\u00e9 in latin-1\n".encode("latin-1"))
    rc, err = _fails(["--load", tmp_path, "--tokenizer-name-or-path", tmp_path, "--prompts-file", bad], capsys)
    assert rc == 2 and str(bad) in err and "UTF-8" in err and "0xe9" in err and "line 2" in err, err


def test_seq_length_beyond_the_models_positions_is_refused(assets, capsys):
    """Issue 30: --seq-length 100000 on a model of 256 positions silently stopped at 256."""
    positions = TINY.max_position_embeddings
    rc, err = _fails(["--load", assets[1, 1], "--tokenizer-name-or-path", assets["hf"], "--prompt", "x",
                      "--seq-length", 100000], capsys)
    assert rc == 2 and f"--seq-length 100000: the model in {assets[1, 1]} has {positions} positions" in err, err


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
