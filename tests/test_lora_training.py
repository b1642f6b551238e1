"""LoRA training (aquila_npu.testing.lora_pretrain: the real aquila_npu.pretrain run, plus a report of parameter
counts and optimizer bytes): tp1 and tp2-pp2 (sequence parallel, full recomputation) give the same losses from one checkpoint on
instruction data with --finetune; only adapter tensors change; checkpoints hold only adapter keys (and their optimizer
state); resuming from --lora-load is exact, bit for bit."""

import os

import pytest
import torch

from helpers import (TRAIN_COMMON, assert_layouts_train_alike, build_training_assets, read_json, read_metrics,
                     stub_torchrun_argv, torchrun)

from aquila_npu.checkpoint import megatron_io, safe_load
from aquila_npu.checkpoint.convert import to_megatron
from aquila_npu.checkpoint.hf_io import HFReader
from aquila_npu.lora.checkpoint import AdapterCheckpoint
from aquila_npu.weights.mapping import LORA_TARGETS

WORKER = "-m aquila_npu.testing.lora_pretrain"
LORA = ["--lora-target-modules", *LORA_TARGETS, "--lora-r", 4, "--lora-alpha", 8]
TP2_PP2 = ["--tensor-model-parallel-size", 2, "--pipeline-model-parallel-size", 2, "--sequence-parallel",
           "--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", 1]


def _train(tmp_path, name, nproc, *args):
    metrics, report = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.json"
    torchrun(WORKER, nproc, [*TRAIN_COMMON, "--metrics-file", metrics, "--report", report, *LORA, *args])
    return read_metrics(metrics), read_json(report)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_training_assets(str(tmp_path_factory.mktemp("pretrain")))


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """tp1 and tp2-pp2 LoRA fine-tuning, 4 iterations, saving at 2 and 4."""
    d = tmp_path_factory.mktemp("lora-train")
    data = ["--finetune", "--is-instruction-dataset", "--data-path", assets["sft"], "--tokenizer-name-or-path",
            assets["tok"], "--split", "100,0,0", "--seq-length", 96, "--train-iters", 4, "--save-interval", 2]
    # tp2 pads the 1003-token vocabulary to 1004; so does tp1 with --make-vocab-size-divisible-by 2 (the padded
    # logits take part in the softmax: the layouts' losses agree only with equal padding)
    tp1 = str(d / "mg-tp1-vocab1004")
    to_megatron(HFReader(assets["hf"]), tp1, 1, 1, make_vocab_size_divisible_by=2)
    out = {"dir": d, "data": data, "tp1_base": tp1}
    out["tp1"] = _train(d, "tp1", 1, *data, "--load", tp1, "--save", d / "ck1")
    out["tp2pp2"] = _train(d, "tp2pp2", 4, *data, *TP2_PP2, "--load", assets[2, 2], "--save", d / "ck4")
    return out


@pytest.mark.slow
def test_tp1_and_tp2_pp2_lora_losses_agree(runs):
    assert_layouts_train_alike(runs)
    ra, rb = runs["tp1"][1], runs["tp2pp2"][1]
    assert ra["counts"]["trainable"] == rb["counts"]["trainable"]  # replicated adapters counted once
    assert "base frozen" in ra["start"] and f"{ra['counts']['trainable']:,} trainable parameters" in ra["start"]


@pytest.mark.slow
def test_only_adapters_train_and_checkpoints_hold_only_adapters(runs, assets):
    for name, ck, base in (("tp1", "ck1", runs["tp1_base"]), ("tp2pp2", "ck4", assets[2, 2])):
        _, report = runs[name]
        assert [s["base_unchanged"] for s in report["saves"]] == [True, True]
        assert report["optimizer_params"] == report["counts"]["trainable_this_rank"]  # no state for the base
        assert report["dtypes"] == ["adapter float32", "base float32"]
        # the optimizer state measured after training is what was predicted at start-up: 2 fp32 moments each
        assert report["saves"][-1]["optimizer_bytes"]["moments_allocated"]
        assert report["saves"][-1]["optimizer_bytes"]["total"] == report["optimizer_bytes_at_start"]["total"] \
            == 8 * report["counts"]["trainable_this_rank"]
        adapter = AdapterCheckpoint(str(runs["dir"] / ck))
        assert adapter.iteration == 4 and adapter.settings.targets == LORA_TARGETS and adapter.settings.r == 4
        layout = megatron_io.CheckpointInfo.read(base).layout
        for pp in range(layout.pp):
            for tp in range(layout.tp):
                saved = adapter.rank_file(tp, pp)
                assert saved["model"] and all(".lora_A.default." in k or ".lora_B.default." in k
                                              for k in saved["model"])
                assert "optimizer" in saved and saved["iteration"] == 4
                assert any(k.endswith("lora_B.default.weight") and v.abs().max() > 0 for k, v in
                           saved["model"].items())  # B started at zero and trained
                initial = safe_load.load(os.path.join(megatron_io.rank_path(base, 1, tp, pp, layout.pp),
                                                      "model_optim_rng.pt"))
                assert os.path.getsize(os.path.join(megatron_io.rank_path(str(runs["dir"] / ck), 4, tp, pp,
                                                                          layout.pp), "model_optim_rng.pt")) \
                    < sum(v.numel() * v.element_size() for v in initial["model"].values())


@pytest.mark.slow
def test_resume_from_lora_load_is_exact(runs, assets, tmp_path):
    """The tp2-pp2 run's iteration-2 adapter checkpoint, resumed with --lora-load (no --finetune), reproduces
    iterations 3 and 4 bit for bit."""
    ck = runs["dir"] / "ck4"
    (ck / megatron_io.TRACKER).write_text("2")
    data = [a for a in runs["data"] if a != "--finetune"]
    resumed, report = _train(tmp_path, "resumed", 4, *data, *TP2_PP2, "--load", assets[2, 2], "--lora-load", ck,
                             "--save", tmp_path / "ck")
    straight = runs["tp2pp2"][0]
    assert resumed == straight[2:], (straight, resumed)
    assert [s["iteration"] for s in report["saves"]] == [4]


@pytest.mark.slow
def test_bf16_base_fp32_adapters_distributed_optimizer_resume_exact(assets, tmp_path):
    """dp2 with the distributed optimizer and a bf16 base: the adapters stay fp32 (so the optimizer keeps no main
    copies: 8 bytes of Adam state per trainable parameter, over the two data-parallel ranks), resume is exact."""
    base = ["--load", assets[1, 1], "--mock-data", "--train-iters", 3, "--bf16", "--use-distributed-optimizer",
            "--lr-decay-style", "cosine", "--min-lr", 1e-4]
    straight, report = _train(tmp_path, "straight", 2, *base, "--save", tmp_path / "ck", "--save-interval", 1)
    assert report["dtypes"] == ["adapter float32", "base bfloat16"]
    opt = report["saves"][-1]["optimizer_bytes"]
    assert opt["main_param_copies"] == 0 and opt["total"] == 8 * report["counts"]["trainable"] // 2
    (tmp_path / "ck" / megatron_io.TRACKER).write_text("1")
    resumed, _ = _train(tmp_path, "resumed", 2, *base, "--lora-load", tmp_path / "ck")
    assert resumed == straight[1:], (straight, resumed)


@pytest.mark.parametrize("resume", [False, True], ids=["new", "resume"])
@pytest.mark.parametrize("script,model", [("tune_aquila2_7b_lora_ptd.sh", "aquila2-7b"),
                                          ("tune_aquila2_34b_lora_ptd.sh", "aquila2-34b")])
def test_lora_example_scripts_parse_with_the_lora_flags(script, model, resume, tmp_path):
    """The scripts' command lines parse with the pretrain parser plus the LoRA flags (as wired) and describe the
    model; 34B LoRA runs on one node of 8 devices, tp8-pp1."""
    from helpers import ROOT

    from aquila_npu.checkpoint.megatron_io import CheckpointInfo
    from aquila_npu.cli.pretrain import parse
    from aquila_npu.models.registry import get_model_spec
    from aquila_npu.training.config import resolve
    from aquila_npu.weights.mapping import Layout

    path = ROOT / "examples" / "aquila2" / script
    env = {"LORA_LOAD": "./ckpt/adapter", "RESUME": "1"} if resume else {}
    launcher, module, argv = stub_torchrun_argv(path, tmp_path, **env)
    assert module == "aquila_npu.pretrain"
    args = parse(argv)
    assert int(launcher["--nproc_per_node"]) * int(launcher["--nnodes"]) == 8
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (8, 1)
    assert args.load.endswith("-tp8-pp1/") and args.save.endswith("-lora/") and args.is_instruction_dataset
    assert (args.lora_target_modules, args.lora_r, args.lora_alpha) == (list(LORA_TARGETS), 16, 32)
    assert args.lora_load == ("./ckpt/adapter" if resume else None)
    assert (args.finetune, args.no_load_optim, args.no_load_rng) == ((False,) * 3 if resume else (True,) * 3)
    spec = get_model_spec(model)
    converted = CheckpointInfo(args.load, 1, Layout(spec, 8, 1, 1), torch.bfloat16, trained=False)
    assert resolve(args, converted, None, 8).spec == spec
