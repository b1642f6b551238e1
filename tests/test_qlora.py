"""QLoRA (issue 26) against transformers + bitsandbytes + peft, on the CPU.

* The NF4 base (``convert_ckpt.py --qlora-nf4``) at tp1, tp2-pp2 and tp4 dequantises, shard by shard, to exactly the
  weights of transformers' 4-bit model (``BitsAndBytesConfig(load_in_4bit, nf4, double quant)``: bitsandbytes'
  ``dequantize_4bit`` of each ``Linear4bit``), bf16 and fp32; its other tensors are the model's own; the linears
  take at most 0.6 bytes per parameter.
* Logits of our QLoRA model (NF4 base + adapter) equal those of ``PeftModel`` on transformers' 4-bit model at tp1-pp1
  and tp2-pp2: fp32 compute within 1e-4; bf16 (and fp16) compute within 4 units in the last place of the largest
  logit (the two implementations round differently: norms, RoPE, SwiGLU, the adapter's output).
* Training: tp1 and tp2-pp2 give the same losses; resuming from --lora-load is exact; the base never changes.
* The merge (NF4 base dequantised, plus the update) equals peft's own merge of a 4-bit layer.
* Bad input: one line, exit status 2, nothing written.
"""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from helpers import (LORA_CASES, ROOT, TRAIN_COMMON, assert_layouts_train_alike, build_training_assets, call_main,
                     fake_npu_env, read_json, read_metrics, stub_torchrun_argv, torchrun)

from aquila_npu.checkpoint import megatron_io, safe_load
from aquila_npu.checkpoint.convert import to_megatron
from aquila_npu.checkpoint.hf_io import HFReader
from aquila_npu.checkpoint.megatron_io import CheckpointInfo, MegatronReader
from aquila_npu.lora import convert as lora_convert
from aquila_npu.testing.tiny_hf import TINY, tiny_llama, tiny_peft
from aquila_npu.weights import nf4
from aquila_npu.weights.mapping import LORA_TARGETS, Layout, hf_names

# TINY's ffn (96) is not a multiple of bitsandbytes' 64-value blocks; 128 is, and at tp4 the row-parallel shards
# (proj: 16 columns, fc2: 32) cut blocks in half
TINY_Q = dataclasses.replace(TINY, name="aquila2-tiny-qlora", intermediate_size=128)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def bnb_model(hf_dir, dtype):
    """transformers' QLoRA base: Aquila2's finetune_qlora.sh quantisation (compute dtype = ``dtype``)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(hf_dir, quantization_config=config, dtype=dtype,
                                                device_map="cpu").eval()


def dequantised_reference(model):
    """{HF name: bitsandbytes' dequantised weight} of a transformers 4-bit model, other tensors as they are."""
    import bitsandbytes as bnb

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            out[name + ".weight"] = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    for name, p in model.state_dict().items():
        if name not in out and torch.is_tensor(p) and p.is_floating_point():
            out[name] = p
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qlora") / "hf"
    tiny_llama(TINY_Q).save_pretrained(d)
    return str(d)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_nf4_shards_dequantise_to_bitsandbytes_weights(hf_dir, dtype, tmp_path):
    ref = dequantised_reference(bnb_model(hf_dir, DTYPES[dtype]))
    for tp, pp in ((1, 1), (2, 2), (4, 1)):
        out = str(tmp_path / f"nf4-tp{tp}-pp{pp}")
        to_megatron(HFReader(hf_dir), out, tp, pp, params_dtype=DTYPES[dtype], qlora_nf4=True)
        info = CheckpointInfo.read(out)
        assert info.is_nf4 and info.nf4["quant_type"] == "nf4" and info.nf4["blocksize"] == 64
        reader = MegatronReader(out)
        for name in hf_names(TINY_Q):
            got = reader.get(name)
            assert got.dtype == DTYPES[dtype] and torch.equal(got, ref[name]), (tp, pp, name)
        nbytes = params = 0
        for t in range(tp):
            for p in range(pp):
                sd = info.load_rank(t, p)["model"]
                b, n = nf4.nf4_bytes(sd)
                nbytes, params = nbytes + b, params + n
                assert all(sd[k].dtype == torch.uint8 for k in sd if k.endswith(("linear_qkv.weight",
                                                                                "linear_fc2.weight")))
        assert params == sum(ref[n].numel() for n in ref if n.split(".")[-2] in LINEARS)
        if tp == 1:  # (the tiny model's 16- and 32-column row-parallel shards hold whole 64-value blocks)
            assert nbytes == params // 2 + params // 64 * 4 + 16 * 4 * TINY_Q.num_layers  # 0.5625 bytes each


@pytest.fixture(scope="module")
def peft_adapter(hf_dir, tmp_path_factory):
    """A PEFT adapter on all seven modules (q/k/v and gate/up sharing A, as our exports), and fixed tokens."""
    d = tmp_path_factory.mktemp("qlora-adapter")
    model = tiny_peft(seed=2, spec=TINY_Q, **LORA_CASES["fused-all"])
    model.save_pretrained(d / "peft")
    tokens = torch.randint(3, TINY_Q.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.save(tokens, d / "tokens.pt")
    return {"dir": d, "peft": str(d / "peft"), "tokens": str(d / "tokens.pt")}


def exact_reference(model, dtype):
    """transformers' model of the same (dequantised) weights in fp32: the logits without bf16 / fp16 rounding."""
    from transformers import AutoModelForCausalLM

    weights = dequantised_reference(model)
    exact = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    missing, _ = exact.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    assert not missing, missing
    return exact.eval()


def _qlora_logits(hf_dir, peft_adapter, tmp_path, tp, pp, dtype):
    from peft import PeftModel

    # Training mode (no dropout anywhere): bitsandbytes' 4-bit product as in training, dequantize_4bit then the matmul.
    # In eval mode on a CPU with AVX512-BF16 its Linear4bit repacks the weights for a CPU kernel with bf16 absmax
    # (bitsandbytes.functional._convert_weight_packed_for_cpu): another, rounder product (5e-3 off in fp32 here).
    tokens = safe_load.load(peft_adapter["tokens"], mmap=False)
    base = bnb_model(hf_dir, DTYPES[dtype])
    with torch.no_grad():
        exact = PeftModel.from_pretrained(exact_reference(base, DTYPES[dtype]), peft_adapter["peft"])(tokens).logits
        ref = PeftModel.from_pretrained(base, peft_adapter["peft"]).train()(tokens).logits.float()
    torch.save(ref, tmp_path / "ref.pt")
    torch.save(exact, tmp_path / "exact.pt")
    base = str(tmp_path / "nf4")
    layout = to_megatron(HFReader(hf_dir), base, tp, pp, make_vocab_size_divisible_by=8,
                         params_dtype=DTYPES[dtype], qlora_nf4=True)
    lora_convert.import_peft(peft_adapter["peft"], str(tmp_path / "adapter"), layout)
    torchrun("-m aquila_npu.testing.qlora_check", tp * pp,
             ["--base", base, "--adapter", tmp_path / "adapter", "--dtype", dtype, "--tokens",
              peft_adapter["tokens"], "--reference", tmp_path / "ref.pt", "--exact", tmp_path / "exact.pt",
              "--out", tmp_path / "out.json"])
    return {**read_json(tmp_path / "out.json"), "ref_vs_exact": (ref - exact).abs().max().item()}


def _check_logits(r, dtype):
    assert r["nf4_modules"] > 0  # the last stage's linears are 4-bit
    assert r["diff_vs_base"] > 1e-2  # the adapter does something
    if dtype == "fp32":
        assert r["max_abs_diff"] < 1e-4 and r["ref_vs_exact"] == 0, r
    else:  # two implementations' roundings (norms, RoPE, SwiGLU, where the adapter's output is rounded, and at tp2
        # megatron-core's all-reduce of the row-parallel partial sums in bf16): ours is as close to the exact logits
        # (the same dequantised weights in fp32 arithmetic) as transformers + bitsandbytes + peft's own are, within a
        # factor of 2 (measured: 0.9-1.6), and within 8 units in the last place of the largest logit of theirs
        # (measured: bf16 3.3 at tp1, 4.5 at tp2-pp2; fp16 3.0)
        assert r["exact_abs_diff"] <= 2 * r["ref_vs_exact"], r
        ulp = torch.finfo(DTYPES[dtype]).eps * 2.0 ** np.floor(np.log2(r["ref_abs_max"]))
        assert r["max_abs_diff"] <= 8 * ulp, (r, ulp)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_tp1_logits_equal_peft_bitsandbytes_qlora(hf_dir, peft_adapter, dtype, tmp_path):
    _check_logits(_qlora_logits(hf_dir, peft_adapter, tmp_path, 1, 1, dtype), dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_tp2_pp2_logits_equal_peft_bitsandbytes_qlora(hf_dir, peft_adapter, dtype, tmp_path):
    _check_logits(_qlora_logits(hf_dir, peft_adapter, tmp_path, 2, 2, dtype), dtype)


# ------------------------------------------------------------------------------------------------------ training
WORKER = "-m aquila_npu.testing.lora_pretrain"
QLORA = ["--qlora", "--lora-target-modules", *LORA_TARGETS, "--lora-r", 4, "--lora-alpha", 8]
TP2_PP2 = ["--tensor-model-parallel-size", 2, "--pipeline-model-parallel-size", 2, "--sequence-parallel",
           "--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", 1]


def _train(d, name, nproc, *args, env=None):
    metrics, report = d / f"{name}.jsonl", d / f"{name}.json"
    torchrun(WORKER, nproc, [*TRAIN_COMMON, "--metrics-file", metrics, "--report", report, *QLORA, *args], env=env)
    return read_metrics(metrics), read_json(report)


@pytest.fixture(scope="module")
def qlora_runs(hf_dir, tmp_path_factory):
    """tp1 and tp2-pp2 QLoRA fine-tuning (fp32 compute on an NF4 base quantised from fp32: the layouts' bases
    dequantise to the same weights, so the losses agree as closely as LoRA's), 4 iterations, saving at 2 and 4."""
    d = tmp_path_factory.mktemp("qlora-train")
    assets = build_training_assets(str(d / "assets"))
    data = ["--finetune", "--is-instruction-dataset", "--data-path", assets["sft"], "--tokenizer-name-or-path",
            assets["tok"], "--split", "100,0,0", "--seq-length", 96, "--train-iters", 4, "--save-interval", 2]
    bases = {}
    for tp, pp in ((1, 1), (2, 2)):  # equal vocabulary padding (1004) in both layouts
        bases[tp, pp] = str(d / f"nf4-tp{tp}-pp{pp}")
        to_megatron(HFReader(hf_dir), bases[tp, pp], tp, pp, make_vocab_size_divisible_by=2 // tp,
                    qlora_nf4=True)
    out = {"dir": d, "data": data, "bases": bases}
    out["tp1"] = _train(d, "tp1", 1, *data, "--load", bases[1, 1], "--save", d / "ck1")
    out["tp2pp2"] = _train(d, "tp2pp2", 4, *data, *TP2_PP2, "--load", bases[2, 2], "--save", d / "ck4")
    return out


@pytest.mark.slow
def test_qlora_training_tp1_and_tp2_pp2_agree_base_unchanged(qlora_runs):
    assert_layouts_train_alike(qlora_runs)
    ra, rb = qlora_runs["tp1"][1], qlora_runs["tp2pp2"][1]
    for report in (ra, rb):
        assert [s["base_unchanged"] for s in report["saves"]] == [True, True]
        assert report["dtypes"] == ["adapter float32", "base float32"]  # (the NF4 linears are buffers)
        assert report["optimizer_params"] == report["counts"]["trainable_this_rank"]  # no state for the base
        assert "QLoRA: base linears NF4" in report["start"]
    assert ra["counts"]["trainable"] == rb["counts"]["trainable"]
    assert ra["counts"]["total"] == rb["counts"]["total"] > TINY_Q.num_parameters()  # base (4-bit too) + adapters


@pytest.mark.slow
def test_qlora_resume_from_lora_load_is_exact(qlora_runs, tmp_path):
    ck = qlora_runs["dir"] / "ck4"
    (ck / megatron_io.TRACKER).write_text("2")
    data = [x for x in qlora_runs["data"] if x != "--finetune"]
    resumed, report = _train(tmp_path, "resumed", 4, *data, *TP2_PP2, "--load", qlora_runs["bases"][2, 2],
                             "--lora-load", ck, "--save", tmp_path / "ck")
    assert resumed == qlora_runs["tp2pp2"][0][2:], (qlora_runs["tp2pp2"][0], resumed)


# ---------------------------------------------------------------------------------------------------------- merge
def test_merge_equals_peft_merge_of_the_4bit_layer(hf_dir, peft_adapter, tmp_path):
    """Merged into the tp2-pp2 NF4 base (dequantised per shard, plus alpha/r B A in fp32), written as fp32 Hugging
    Face weights: equal to peft's merge of a 4-bit layer before it re-quantises (``dequantize_bnb_weight(W) +
    get_delta_weight``), and re-quantised by bitsandbytes equal to ``merge_and_unload``'s 4-bit weights."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from peft.utils.integrations import dequantize_bnb_weight

    from aquila_npu.checkpoint.convert import to_huggingface

    base = str(tmp_path / "nf4")
    layout = to_megatron(HFReader(hf_dir), base, 2, 2, params_dtype=torch.bfloat16, qlora_nf4=True)
    lora_convert.import_peft(peft_adapter["peft"], str(tmp_path / "adapter"), layout)
    out = to_huggingface(lora_convert.LoraMergedReader(base, str(tmp_path / "adapter")), str(tmp_path / "merged"),
                         params_dtype=torch.float32)
    merged = HFReader(out)
    model = PeftModel.from_pretrained(bnb_model(hf_dir, torch.bfloat16), peft_adapter["peft"])
    expected = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and isinstance(module.get_base_layer(), bnb.nn.Linear4bit):
            w = module.get_base_layer().weight
            hf_name = name.replace("base_model.model.", "") + ".weight"
            expected[hf_name] = dequantize_bnb_weight(w, state=w.quant_state) + module.get_delta_weight("default")
    assert len(expected) == 7 * TINY_Q.num_layers
    for name, w in expected.items():
        assert torch.equal(merged.get(name), w.float()), name
    unloaded = model.merge_and_unload()
    for name, module in unloaded.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            ours = bnb.nn.Params4bit(merged.get(name + ".weight").clone(), requires_grad=False,
                                     quant_type="nf4", compress_statistics=True).to("cpu")
            assert torch.equal(bnb.functional.dequantize_4bit(ours.data, ours.quant_state),
                               bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)), name


# ------------------------------------------------------------------------------------------------------ bad input
def _convert(*args):
    from aquila_npu.cli.convert import main

    return main, ["--model-type", "GPT", "--loader", "llama2_hf", "--saver", "megatron", *args]


def test_bad_qlora_input_is_one_line_exit_2_nothing_written(hf_dir, tmp_path, capsys):
    from aquila_npu.cli.pretrain import main as pretrain

    nf4_dir = tmp_path / "nf4"
    main, argv = _convert("--load-dir", hf_dir, "--save-dir", nf4_dir, "--qlora-nf4")
    assert call_main(main, argv, capsys)[0] == 0
    plain = tmp_path / "bf16"
    main, argv = _convert("--load-dir", hf_dir, "--save-dir", plain, "--params-dtype", "bf16")
    assert call_main(main, argv, capsys)[0] == 0
    other = tmp_path / "other"  # an NF4 base recorded as quantised with blocksize 128
    import shutil

    shutil.copytree(nf4_dir, other)
    path = os.path.join(megatron_io.rank_path(str(other), 1, 0, 0, 1), "model_optim_rng.pt")
    ck = safe_load.load(path, mmap=False)
    ck[megatron_io.NF4_ENTRY]["blocksize"] = 128
    torch.save(ck, path)
    save = tmp_path / "save"
    common = ["--mock-data", "--train-iters", 1, *TRAIN_COMMON, "--save", save]
    cases = [
        (["--qlora", "--load", nf4_dir, *common], "--qlora needs --lora-target-modules"),
        (["--qlora", "--lora-target-modules", "linear_qkv", "--load", plain, *common], "not an NF4 base"),
        (["--qlora", "--lora-target-modules", "linear_qkv", "--load", other, *common], "blocksize 128"),
        (["--lora-target-modules", "linear_qkv", "--load", nf4_dir, *common], "add --qlora"),
        (["--load", nf4_dir, "--finetune", *common], "NF4 base"),
    ]
    for argv, message in cases:
        rc, err = call_main(pretrain, argv, capsys)
        assert rc == 2 and message in err, (argv, err)
        assert not save.exists()
    main, argv = _convert("--load-dir", hf_dir, "--save-dir", tmp_path / "hf-out", "--qlora-nf4",
                          "--save-model-type", "save_huggingface_llama")
    rc, err = call_main(main, argv, capsys)
    assert rc == 2 and "--qlora-nf4" in err and not (tmp_path / "hf-out").exists()
    main, argv = _convert("--load-dir", nf4_dir, "--save-dir", tmp_path / "again", "--qlora-nf4")
    argv[argv.index("llama2_hf")] = "megatron"
    rc, err = call_main(main, argv, capsys)
    assert rc == 2 and "already an NF4 base" in err and not (tmp_path / "again").exists()


# ------------------------------------------------------------------------------------------------- example scripts
@pytest.mark.parametrize("script,model,tp", [("tune_aquila2_7b_qlora_ptd.sh", "aquila2-7b", 8),
                                             ("tune_aquila2_34b_qlora_ptd.sh", "aquila2-34b", 8)])
def test_qlora_example_scripts_parse(script, model, tp, tmp_path):
    from aquila_npu.cli.pretrain import parse

    launcher, module, argv = stub_torchrun_argv(ROOT / "examples" / "aquila2" / script, tmp_path)
    assert module == "aquila_npu.pretrain"
    args = parse(argv)
    assert args.qlora and args.lora_target_modules == list(LORA_TARGETS) and args.is_instruction_dataset
    assert args.tensor_model_parallel_size == tp and args.load.rstrip("/").endswith("-nf4") and args.bf16


# ------------------------------------------------------------------------- the NPU (fake torch_npu runtime)
@pytest.mark.slow
def test_qlora_training_through_the_fake_npu_runtime_equals_the_cpu(qlora_runs, tmp_path):
    """``--device npu`` (the fake torch_npu runtime, fused RMSNorm and SwiGLU): bitsandbytes has no NPU backend, so its
    pure-torch default kernel dequantises on the npu device; the losses equal the CPU run's (tp2-pp2, fp32)."""
    env = fake_npu_env()
    npu, _ = _train(tmp_path, "npu", 4, *qlora_runs["data"], *TP2_PP2, "--load", qlora_runs["bases"][2, 2],
                    "--device", "npu", "--use-fused-rmsnorm", "--use-fused-swiglu", env=env)
    cpu = qlora_runs["tp2pp2"][0]
    assert np.max(np.abs(np.array(npu) - np.array(cpu)) / np.abs(np.array(cpu))) < 1e-5, (npu, cpu)


# ------------------------------------------------------------------------- adapters at inference, unmerged
@pytest.mark.slow
@pytest.mark.parametrize("base_kind", ["nf4", "fp32"])
def test_generate_with_lora_load_equals_the_merged_model(hf_dir, peft_adapter, qlora_runs, base_kind, tmp_path):
    """``aquila_npu.generate --lora-load`` (the adapter on the base, tp2-pp2, unmerged) gives the greedy tokens of the
    merged model (the base, dequantised for NF4, plus alpha/r B A), on an NF4 base (QLoRA) and a full-precision one
    (LoRA); ``aquila_npu.evaluate --lora-load`` on the NF4 base the merged model's BoolQ answers and log-likelihoods."""
    from aquila_npu.lora.convert import LoraMergedReader

    tok = qlora_runs["dir"] / "assets" / "tok"
    base = str(tmp_path / "base")
    layout = to_megatron(HFReader(hf_dir), base, 2, 2, params_dtype=torch.float32, qlora_nf4=base_kind == "nf4")
    adapter = str(tmp_path / "adapter")
    lora_convert.import_peft(peft_adapter["peft"], adapter, layout)
    merged = str(tmp_path / "merged")
    to_megatron(LoraMergedReader(base, adapter), merged, 2, 2)
    prompts = ["What color is the snow?", "What color is the sea? The sea", "apple sky grass"]
    outs = {}
    for name, extra in (("adapted", ["--load", base, "--lora-load", adapter]), ("merged", ["--load", merged])):
        out = tmp_path / f"{name}.jsonl"
        torchrun("-m aquila_npu.generate", 4, [*extra, "--tokenizer-name-or-path", tok, "--max-new-tokens", 12,
                                               "--greedy", *[x for p in prompts for x in ("--prompt", p)],
                                               "--output", out])
        outs[name] = [json.loads(line)["token_ids"] for line in open(out, encoding="utf-8")]
    assert outs["adapted"] == outs["merged"] and all(len(r) == 12 for r in outs["merged"]), outs
    if base_kind != "nf4":
        return
    # aquila_npu.evaluate --lora-load (the same session): BoolQ's log-likelihoods and answers equal the merged model's
    rows = [{"question": q, "title": "t", "answer": i % 2 == 0, "passage": p}
            for i, (q, p) in enumerate([("is snow white", "The snow is white."), ("is the sea red", "The sea is blue."),
                                        ("is grass green", "Grass grows in the sky and is green.")])]
    data = tmp_path / "boolq.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reports = {}
    for name, extra in (("adapted", ["--load", base, "--lora-load", adapter]), ("merged", ["--load", merged])):
        out = tmp_path / f"boolq-{name}.json"
        torchrun("-m aquila_npu.evaluate", 4, ["--task", "boolq", "--task-data-path", data, *extra,
                                               "--tokenizer-name-or-path", tok, "--output", out])
        reports[name] = read_json(out)["records"]
    assert [r["prediction"] for r in reports["adapted"]] == [r["prediction"] for r in reports["merged"]]
    for a, m in zip(reports["adapted"], reports["merged"]):
        assert a["logprob_yes"] == pytest.approx(m["logprob_yes"], abs=1e-4), (a, m)
        assert a["logprob_no"] == pytest.approx(m["logprob_no"], abs=1e-4), (a, m)


def test_lora_load_of_another_layout_at_inference_is_one_line(hf_dir, peft_adapter, tmp_path, capsys):
    from aquila_npu.cli.generate import main as generate

    base = str(tmp_path / "base")
    to_megatron(HFReader(hf_dir), base, 1, 1, qlora_nf4=True)
    adapter = str(tmp_path / "adapter-tp2")
    lora_convert.import_peft(peft_adapter["peft"], adapter, Layout(TINY_Q, 2, 1))
    rc, err = call_main(generate, ["--load", base, "--lora-load", adapter, "--tokenizer-name-or-path", hf_dir,
                                   "--prompt", "x", "--max-new-tokens", 1], capsys)
    assert rc == 2 and "--lora-load" in err and "tp2-pp1" in err, err
    rc, err = call_main(generate, ["--load", base, "--lora-load", str(tmp_path / "nowhere"),
                                   "--tokenizer-name-or-path", hf_dir, "--prompt", "x"], capsys)
    assert rc == 2 and "--lora-load" in err, err
