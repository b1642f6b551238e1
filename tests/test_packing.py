"""Sequences of several documents (issue 23): packed instruction samples and pretraining documents split at EOD.

References that are not the code under test: the same samples trained one per sequence (the padded layout), each
document alone, and a plain per-document attention written here."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import (ROOT, assert_one_line_error, build_training_assets, child_env, fake_npu_env,
                     preprocess_instructions, read_metrics, torchrun)

from aquila_npu.data.packing import best_fit_decreasing


# ------------------------------------------------------------------------------------------------- the bin packing
def test_best_fit_decreasing_places_every_item_once_and_whole_within_capacity():
    rng = np.random.RandomState(0)
    lengths = np.clip(rng.lognormal(4.0, 0.8, 3000).astype(int), 1, 512)
    packs = best_fit_decreasing(lengths, 512)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in p) <= 512 for p in packs)
    assert packs == best_fit_decreasing(lengths, 512)  # deterministic
    assert lengths.sum() / (len(packs) * 512) > 0.98  # little waste
    # first-fit-decreasing's classic bound holds (11/9 of the lower bound, plus one)
    assert len(packs) <= 11 / 9 * np.ceil(lengths.sum() / 512) + 1


def test_best_fit_decreasing_refuses_an_item_longer_than_the_capacity():
    with pytest.raises(ValueError, match="does not fit"):
        best_fit_decreasing([3, 9], 8)


def test_real_alpaca_rows_fill_the_sequences(shared_data, tmp_path):
    """The 5,000 real Alpaca rows, as tools/preprocess_data.py writes them with the real Aquila2 tokenizer and
    ModelLink's alpaca template: packed at 2048 and 512 they fill the sequences."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from aquila_npu.cli.preprocess import main as preprocess
    from aquila_npu.data.datasets import instruction_positions

    prefix = str(tmp_path / "alpaca")
    assert preprocess(["--input", str(shared_data / "alpaca" / "alpaca_5000.json"), "--tokenizer-name-or-path",
                       str(shared_data / "aquila2-tokenizer"), "--output-prefix", prefix, "--handler-name",
                       "GeneralInstructionHandler", "--append-eod", "--workers", "1", "--log-interval", "100000"]) == 0
    index = IndexedDataset(f"{prefix}_packed_input_ids_document")
    lengths = np.array(index.sequence_lengths)  # a copy: the index's arrays live in its memory map
    assert len(lengths) == 5000
    for seq in (2048, 512):
        positions = instruction_positions(lengths, seq)
        packs = best_fit_decreasing(positions, seq)
        fill = positions.sum() / (len(packs) * seq)
        # within 3% of the fewest sequences that could hold the tokens at all
        assert fill > 0.97 and len(packs) <= 1.03 * np.ceil(positions.sum() / seq) + 1, (seq, fill, len(packs))


# ----------------------------------------------------------------------------------- instruction data, packed
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_training_assets(str(tmp_path_factory.mktemp("packing")))


def _datasets(assets, seq, num_samples, pack=True, seed=1234):
    from aquila_npu.data.datasets import build_instruction_datasets

    return build_instruction_datasets(assets["sft"], "100,0,0", seq, seed, [num_samples, 0, 0],
                                      tokenizer=assets["tok"], pack=pack)[0]


def test_packs_hold_each_sample_once_per_epoch_whole_and_resume_the_same(assets):
    from aquila_npu.data.datasets import instruction_sample

    one_epoch = _datasets(assets, 128, None)
    n = len(one_epoch.dataset)
    seen = [int(i) for p in one_epoch.packs for i in p]
    assert sorted(seen) == list(range(n))  # every sample exactly once in the epoch
    longer = _datasets(assets, 128, 3 * len(one_epoch))  # three epochs
    assert [list(p) for p in longer.packs[:len(one_epoch)]] == [list(p) for p in one_epoch.packs]  # resumable
    for epoch in range(3):
        packs = longer.packs[epoch * len(one_epoch):(epoch + 1) * len(one_epoch)]
        assert sorted(int(i) for p in packs for i in p) == list(range(n))
    assert [list(p) for p in longer.packs[len(one_epoch):2 * len(one_epoch)]] != \
        [list(p) for p in one_epoch.packs]  # each epoch packs its own shuffle
    # a pack is its samples, whole, each as the padded layout has it (then the padding)
    sample = one_epoch[0]
    at = 0
    for number, i in enumerate(one_epoch.packs[0], 1):
        alone = instruction_sample(*one_epoch.dataset.get(int(i)), 128)
        n_i = int((np.asarray(one_epoch.dataset.get(int(i))[0]).size - 1))
        for key in ("tokens", "labels", "loss_mask"):
            assert torch.equal(sample[key][at:at + n_i], alone[key][:n_i]), key
        assert (sample["document_ids"][at:at + n_i] == number).all()
        assert torch.equal(sample["position_ids"][at:at + n_i], torch.arange(n_i))
        at += n_i
    assert (sample["document_ids"][at:] == 0).all() and not sample["loss_mask"][at:].any()


def _model(cpu_device, spec=None):
    from aquila_npu.checkpoint.load_model import build_stage
    from aquila_npu.testing.tiny_hf import TINY, tiny_llama
    from aquila_npu.weights.mapping import Layout, hf_stage_to_mcore

    spec = spec or TINY.replace(max_position_embeddings=256)
    hf = tiny_llama(spec)
    layout = Layout(spec, 1, 1, 8)
    shard = hf_stage_to_mcore(hf.state_dict().__getitem__, layout, 0)[0]
    model, _ = build_stage(spec, layout, cpu_device, shard, params_dtype=torch.float32, pp_rank=0,
                           parallel_output=True)  # as training builds it
    return model.train()


def _per_token_loss_and_grads(model, batch, packed=None):
    model.zero_grad()
    loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], packed_seq_params=packed)
    (loss * batch["loss_mask"]).sum().backward()
    return loss.detach()[0], {n: p.grad.clone() for n, p in model.named_parameters()}


def test_packed_losses_and_gradients_equal_one_sample_per_sequence(assets, cpu_device):
    """Each sample's per-token losses in a packed sequence are those of the sample padded alone; the gradient of
    the packed sequence's loss is the sum of the samples' gradients (fp32, relative 1e-5)."""
    from aquila_npu.training.packing import fold, packed_params

    model = _model(cpu_device)
    packed_ds = _datasets(assets, 256, None)
    pack = max(packed_ds.packs, key=len)
    assert len(pack) >= 3
    sample = packed_ds[packed_ds.packs.index(pack)]
    batch = fold({k: v.unsqueeze(0) for k, v in sample.items() if k != "document_ids"})
    ours, grads = _per_token_loss_and_grads(model, batch, packed_params(sample["document_ids"][None], "cpu"))
    from aquila_npu.data.datasets import instruction_sample

    total = {n: torch.zeros_like(g) for n, g in grads.items()}
    at = 0
    for i in pack:
        ids, labels = packed_ds.dataset.get(int(i))
        alone = {k: v.unsqueeze(0) for k, v in instruction_sample(ids, labels, 256).items()}
        ref, g = _per_token_loss_and_grads(model, alone)
        n = len(ids) - 1
        torch.testing.assert_close(ours[at:at + n], ref[:n], rtol=1e-5, atol=1e-6)
        for name in total:
            total[name] += g[name]
        at += n
    for name, g in grads.items():
        torch.testing.assert_close(g, total[name], rtol=1e-5, atol=1e-6, msg=name)


def test_document_attention_equals_plain_attention_per_document(cpu_device):
    """The attention modules' packed path against plain per-document causal attention written here (GQA, forward and
    backward)."""
    from megatron.core.transformer.enums import AttnMaskType

    from aquila_npu.device.torch_modules import SDPAAttention
    from aquila_npu.models.config import transformer_config
    from aquila_npu.testing.tiny_hf import TINY
    from aquila_npu.training.packing import packed_params

    attn = SDPAAttention(transformer_config(TINY), 1, AttnMaskType.causal, "self").train()
    lengths = [5, 1, 9, 3]
    t, n, g, d = sum(lengths), TINY.num_attention_heads, TINY.num_key_value_heads, TINY.head_dim
    torch.manual_seed(0)
    q, k, v = (torch.randn(t, h, d, requires_grad=True) for h in (n, g, g))
    ids = torch.cat([torch.full((m,), i) for i, m in enumerate(lengths)])[None]
    ours = attn(q, k, v, None, packed_seq_params=packed_params(ids, "cpu"))
    ref, at = [], 0
    for m in lengths:
        qi = q[at:at + m].transpose(0, 1)  # [n, m, d]
        ki, vi = (x[at:at + m].transpose(0, 1).repeat_interleave(n // g, 0) for x in (k, v))
        scores = qi @ ki.transpose(1, 2) / d ** 0.5
        scores = scores.masked_fill(torch.ones(m, m, dtype=torch.bool).triu(1), float("-inf"))
        ref.append((scores.softmax(-1) @ vi).transpose(0, 1).reshape(m, n * d))
        at += m
    ref = torch.cat(ref)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(ref)
    ga = torch.autograd.grad(ours, (q, k, v), grad)
    gb = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------- pretraining documents at EOD
def test_pretraining_documents_split_at_eod_equal_each_document_alone(assets, cpu_device):
    """GPT samples with --reset-attention-mask: every document's per-token losses are those of the document alone."""
    from aquila_npu.data.datasets import build_pretrain_datasets
    from aquila_npu.data.tokenizer import MCoreTokenizer
    from aquila_npu.training.packing import packed_params

    prefix = _pretraining_data(assets)
    tok = MCoreTokenizer.from_pretrained(assets["tok"])
    ds = build_pretrain_datasets(prefix, "100,0,0", 96, 1234, tok, [4, 0, 0], reset_attention_mask=True,
                                 reset_position_ids=True)[0]
    model = _model(cpu_device)
    sample = ds[0]
    ids = sample["document_ids"]
    assert len(set(ids.tolist())) >= 3 and (sample["tokens"] == tok.eod).sum() >= 2
    batch = {k: v[None] for k, v in sample.items() if k != "document_ids"}
    ours, _ = _per_token_loss_and_grads(model, batch, packed_params(ids[None], "cpu"))
    for d in ids.unique().tolist():
        where = (ids == d).nonzero().reshape(-1)
        a, b = int(where[0]), int(where[-1]) + 1
        alone = {k: v[None, a:b] for k, v in sample.items() if k in ("tokens", "labels", "loss_mask")}
        alone["position_ids"] = torch.arange(b - a)[None]
        ref, _ = _per_token_loss_and_grads(model, alone)
        torch.testing.assert_close(ours[a:b], ref, rtol=1e-5, atol=1e-6)


def _pretraining_data(assets):
    from aquila_npu.cli.preprocess import main as preprocess

    prefix = os.path.join(assets["dir"], "pt", "docs")
    if not os.path.exists(prefix + "_text_document.idx"):
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        with open(prefix + ".jsonl", "w") as f:
            for i in range(40):
                f.write(json.dumps({"text": f"What color is the sky {i}? The sky is blue."}) + "\n")
        assert preprocess(["--input", prefix + ".jsonl", "--tokenizer-name-or-path", assets["tok"],
                           "--output-prefix", prefix, "--append-eod", "--workers", "1", "--log-interval", "1000"]) == 0
    return prefix + "_text_document"


# ------------------------------------------------------------------ training runs: packed vs one per sequence
TRAIN = ["--finetune", "--is-instruction-dataset", "--split", "100,0,0", "--lr", 1e-3, "--lr-decay-style", "constant",
         "--clip-grad", 1.0, "--log-interval", 1, "--eval-interval", 1000, "--train-iters", 3, "--micro-batch-size", 1]
TP2_PP2_SP = ["--tensor-model-parallel-size", 2, "--pipeline-model-parallel-size", 2, "--sequence-parallel"]


@pytest.fixture(scope="module")
def four_samples(assets, tmp_path_factory):
    """Instruction data of four short samples (AquilaChat2's aquila-v1 template: no system prompt): one packed
    sequence of 128 tokens holds them all, so both layouts train on all four in every iteration. Returns the data
    flags and the shortest padded sequence length that holds the longest sample."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from helpers import instruction_rows

    d = tmp_path_factory.mktemp("four")
    prefix = preprocess_instructions(instruction_rows()[:4], assets["tok"], str(d / "sft" / "four"), "--append-eod",
                                     "--prompt-type", "aquila-v1")
    index = IndexedDataset(prefix + "_packed_input_ids_document")  # alive while its memory-mapped arrays are read
    positions = np.array(index.sequence_lengths) - 1
    assert positions.sum() <= 128, positions
    return ["--data-path", prefix, "--tokenizer-name-or-path", assets["tok"]], int(positions.max() + 1) // 2 * 2


def _run(tmp_path, name, nproc, args, env=None):
    metrics = tmp_path / f"{name}.jsonl"
    torchrun("-m aquila_npu.pretrain", nproc, [*TRAIN, *args, "--metrics-file", metrics], env=env)
    return np.array(read_metrics(metrics)), np.array(read_metrics(metrics, "grad_norm"))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["full-distopt", "lora-recompute", "npu-fused", "bf16", "lora-tp1"])
def test_packed_training_equals_one_sample_per_sequence(assets, four_samples, tmp_path, variant):
    """The same four samples per iteration, packed in one 128-token sequence (global batch 1) or one per padded
    sequence (global batch 4): equal losses and gradient norms, iteration after iteration. tp2-pp2 with sequence
    parallelism: full fine-tuning with the distributed optimizer and overlapped gradient reduction; LoRA with full
    recomputation; the fake NPU runtime with every fused kernel (npu_fusion_attention's TND layout, the fused RoPE with
    restarting positions); bf16 (its rounding: relative 1e-2). LoRA at tp1 in one process."""
    data, padded_seq = four_samples
    extra = [*data, *TP2_PP2_SP, "--load", assets[2, 2]]
    nproc, env, rtol = 4, None, 1e-5
    if variant == "full-distopt":
        extra += ["--use-distributed-optimizer", "--overlap-grad-reduce"]
    if variant == "bf16":
        extra += ["--bf16"]
        rtol = 1e-2
    if variant == "lora-tp1":
        extra = [*data, "--load", assets[1, 1], "--lora-target-modules", "linear_qkv", "linear_proj", "linear_fc1",
                 "linear_fc2", "--lora-r", 4, "--device", "cpu"]
        nproc = 1
    if variant == "lora-recompute":
        extra += ["--lora-target-modules", "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "--lora-r", 4,
                  "--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", 1]
    reports = tmp_path / "npu-report"
    if variant == "npu-fused":
        extra += ["--device", "npu", "--use-flash-attn", "--use-fused-rotary-pos-emb", "--use-fused-rmsnorm",
                  "--use-fused-swiglu"]
        env = fake_npu_env(AQUILA_FAKE_NPU_REPORT=str(reports))
    packed = _run(tmp_path, "packed", nproc, [*extra, "--seq-length", 128, "--global-batch-size", 1,
                                             "--reset-attention-mask", "--reset-position-ids"], env)
    if variant == "npu-fused":  # the packed run went through the kernels (TND attention, fused thd RoPE)
        calls = [json.loads(p.read_text())["calls"] for p in reports.glob("rank*.json")]
        assert all(c.get("npu_fusion_attention") and c.get("npu_rotary_mul") for c in calls), calls
    padded = _run(tmp_path, "padded", nproc, [*extra, "--seq-length", padded_seq, "--global-batch-size", 4], env)
    for a, b in zip(packed, padded):
        assert len(a) == len(b) == 3, (a, b)
        np.testing.assert_allclose(a, b, rtol=rtol)
    assert len(set(packed[0])) == 3  # it learns: the losses move


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("argv,expected", [
    (["--model", "aquila2-tiny", "--mock-data", "--train-iters", "1", "--reset-attention-mask"],
     "--reset-attention-mask needs documents: --mock-data has none"),
    (["--model", "aquila2-tiny", "--mock-data", "--train-iters", "1", "--reset-position-ids"],
     "--reset-position-ids needs --reset-attention-mask"),
    (["--model", "aquila2-tiny", "--data-path", "x", "--tokenizer-name-or-path", "t", "--train-iters", "1",
      "--is-instruction-dataset", "--eod-mask-loss"], "--eod-mask-loss is for pretraining documents"),
])
def test_contradicting_packing_flags_are_one_line(argv, expected, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "aquila_npu.pretrain", *argv, "--save", str(tmp_path / "ck")],
                          env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr)
    assert expected in proc.stderr
    assert not (tmp_path / "ck").exists()


def test_reset_attention_mask_on_data_without_eod_is_one_line(assets, tmp_path):
    from aquila_npu.cli.preprocess import main as preprocess

    prefix = str(tmp_path / "noeod")
    with open(prefix + ".jsonl", "w") as f:
        f.writelines(json.dumps({"text": f"sentence {i} without an end token"}) + "\n" for i in range(8))
    assert preprocess(["--input", prefix + ".jsonl", "--tokenizer-name-or-path", assets["tok"], "--output-prefix",
                       prefix, "--workers", "1"]) == 0
    proc = subprocess.run([sys.executable, "-m", "aquila_npu.pretrain", "--model", "aquila2-tiny", "--data-path",
                           prefix + "_text_document", "--tokenizer-name-or-path", assets["tok"], "--train-iters", "1",
                           "--seq-length", "32", "--reset-attention-mask", "--device", "cpu", "--save",
                           str(tmp_path / "ck")], env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert_one_line_error(proc.stderr)
    assert "do not end with the end-of-document token" in proc.stderr and "--append-eod" in proc.stderr
    assert not (tmp_path / "ck").exists()


def test_pack_with_pretraining_data_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", "x.jsonl",
                           "--tokenizer-name-or-path", "t", "--output-prefix", str(tmp_path / "o"), "--pack"],
                          env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr)
    assert "--pack packs instruction samples" in proc.stderr and not list(tmp_path.iterdir())


@pytest.mark.parametrize("script", ["tune_aquila2_7b_ptd.sh", "tune_aquila2_34b_ptd_16p.sh",
                                    "tune_aquila2_7b_lora_ptd.sh", "tune_aquila2_34b_lora_ptd.sh"])
@pytest.mark.parametrize("pack", ["", "0"])
def test_fine_tuning_scripts_pack_by_default_and_pad_with_pack_0(script, pack, tmp_path):
    from helpers import stub_torchrun_argv

    from aquila_npu.cli.pretrain import parse

    path = ROOT / "examples" / "aquila2" / script
    _, _, argv = stub_torchrun_argv(path, tmp_path, **({"PACK": pack} if pack else {}))
    args = parse(argv)
    assert args.is_instruction_dataset
    assert (args.reset_attention_mask, args.reset_position_ids) == ((False, False) if pack == "0" else (True, True))
