"""aquila_npu.pretrain (issue 5): layouts agree, resume is exact, SFT learns responses, the loss counts exactly the
response tokens (checked against Hugging Face's own loss), and flags fail clearly."""

import os
import subprocess
from functools import partial

import numpy as np
import pytest
import torch

from helpers import (ROOT, TRAIN_COMMON, assert_one_line_error, build_training_assets, child_env, forked_ranks,
                     preprocess_instructions, read_metrics, run_module, torchrun)

from aquila_npu.checkpoint import safe_load
from aquila_npu.ports import free_port

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_training_assets(str(tmp_path_factory.mktemp("pretrain")))


def _train(nproc, metrics, *args):
    torchrun("-m aquila_npu.pretrain", nproc, [*TRAIN_COMMON, "--metrics-file", metrics, *args])
    return read_metrics(metrics)


@pytest.mark.slow
@pytest.mark.oldest_torch
def test_tp1_and_tp2_pp2_give_the_same_losses_from_one_checkpoint(assets, tmp_path):
    """tp2-pp2 also runs with sequence parallelism and full activation recomputation: neither may change the math."""
    runs = {}
    for tp, pp in ((1, 1), (2, 2)):
        runs[tp, pp] = _train(tp * pp, tmp_path / f"m{tp}{pp}.jsonl", "--load", assets[tp, pp], "--mock-data",
                              "--tokenizer-name-or-path", assets["tok"], "--train-iters", 4,
                              "--tensor-model-parallel-size", tp, "--pipeline-model-parallel-size", pp,
                              *(["--sequence-parallel", "--recompute-granularity", "full", "--recompute-method",
                                 "uniform", "--recompute-num-layers", 1] if tp > 1 else []))
    a, b = np.array(runs[1, 1]), np.array(runs[2, 2])
    assert len(a) == len(b) == 4 and len(set(a)) == 4  # the weights move: the losses differ per iteration
    assert np.max(np.abs(a - b) / np.abs(a)) < 1e-3, (a, b)
    ga, gb = (np.array(read_metrics(tmp_path / f"m{t}{p}.jsonl", "grad_norm")) for t, p in ((1, 1), (2, 2)))
    assert np.max(np.abs(ga - gb) / ga) < 1e-3, (ga, gb)


RESUME_CASES = {  # (processes, tensor-parallel size, flags)
    "dropout": (1, 1, ["--hidden-dropout", 0.1, "--attention-dropout", 0.1]),
    "dp2-ddp-fp32": (2, 1, []),
    "dp2-ddp-bf16": (2, 1, ["--bf16"]),
    "dp2-distributed-optimizer-fp32": (2, 1, ["--use-distributed-optimizer"]),
    "dp2-distributed-optimizer-bf16": (2, 1, ["--use-distributed-optimizer", "--bf16"]),
    "dp2xtp2-distributed-optimizer-fp32": (4, 2, ["--use-distributed-optimizer"]),
    "dp2xtp2-distributed-optimizer-bf16": (4, 2, ["--use-distributed-optimizer", "--bf16"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_reproduces_later_iterations_exactly(assets, tmp_path, case):
    """Stop at iteration 3 (--exit-interval, saving), resume: iterations 4-6 equal the uninterrupted run's bit for
    bit, for each optimizer / dtype pair (ranks forked from helpers' forkserver, as torchrun would start them)."""
    from aquila_npu.cli.pretrain import main

    nproc, tp, flags = RESUME_CASES[case]
    start = ["--load", assets[1, 1], "--tokenizer-name-or-path", assets["tok"]] if tp == 1 else \
        ["--model", "aquila2-tiny"]
    base = [*TRAIN_COMMON, "--mock-data", "--train-iters", 6, "--lr-decay-style", "cosine", "--lr-warmup-iters", 1,
            "--min-lr", 1e-4, "--tensor-model-parallel-size", tp, *flags]

    def train(name, *args):
        (tmp_path / name).mkdir()
        argv = [str(a) for a in [*base, *args, "--metrics-file", tmp_path / f"{name}.jsonl"]]
        rcs = forked_ranks(partial(main, argv), nproc, tmp_path / name)
        assert rcs == [0] * nproc, [open(tmp_path / name / f"rank{r}.log").read()[-3000:] for r in range(nproc)]
        return read_metrics(tmp_path / f"{name}.jsonl")

    ck = tmp_path / "ck"
    straight = train("straight", *start)
    first = train("first", *start, "--save", ck, "--save-interval", 2, "--exit-interval", 3, "--tensorboard-dir",
                  tmp_path / "tb")
    assert (ck / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert sorted(os.listdir(ck)) == ["iter_0000002", "iter_0000003", "latest_checkpointed_iteration.txt"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no lock or staging left behind
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
    resumed = train("resumed", "--load", ck, *start[2:])
    assert len(set(straight)) == 6 and first == straight[:3]
    assert resumed == straight[3:], (straight, resumed)  # bit for bit
    lrs = read_metrics(tmp_path / "straight.jsonl", "learning_rate")
    assert read_metrics(tmp_path / "resumed.jsonl", "learning_rate") == lrs[3:]


@pytest.mark.slow
def test_sft_lowers_the_response_loss(assets, tmp_path):
    losses = _train(1, tmp_path / "sft.jsonl", "--load", assets[1, 1], "--finetune", "--is-instruction-dataset",
                    "--data-path", assets["sft"], "--split", "100,0,0", "--tokenizer-name-or-path", assets["tok"],
                    "--train-iters", 30, "--lr", 3e-3, "--save", tmp_path / "sft-ck", "--seq-length", 128)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), losses
    meta = safe_load.load(str(tmp_path / "sft-ck/iter_0000030/mp_rank_00/model_optim_rng.pt"))
    assert meta["iteration"] == 30 and meta["consumed_train_samples"] == 120  # --finetune started at 0


def test_loss_counts_exactly_the_response_tokens(assets, tmp_path):
    """A batch of a sample whose response lies beyond --seq-length (prompt only in the window) and a normal one: our
    first-iteration loss equals Hugging Face's own causal-LM loss over the normal sample's response tokens."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoModelForCausalLM

    rows = [{"instruction": "What color is the sky? " * 40, "input": "", "output": "The sky is blue."},
            {"instruction": "What color is the sea?", "input": "", "output": "The sea is blue."}]
    prefix = preprocess_instructions(rows, assets["tok"], str(tmp_path / "mask" / "alpaca"), "--append-eod")
    ids = IndexedDataset(prefix + "_packed_input_ids_document")
    labels = IndexedDataset(prefix + "_packed_labels_document")
    seq = len(ids[1]) + 3  # the normal sample fits (padded); the long one's response lies beyond the window
    assert (labels[0][: seq + 1] == -100).all() and (labels[1] != -100).any()
    hf = AutoModelForCausalLM.from_pretrained(assets["hf"]).eval()
    with torch.no_grad():
        x = torch.tensor(ids[1], dtype=torch.long)[None]
        expected = hf(x, labels=torch.tensor(labels[1], dtype=torch.long)[None]).loss.item()
        everything = hf(x, labels=x).loss.item()  # counting the prompt too: the test can tell the two apart
    (loss,) = _train(1, tmp_path / "m.jsonl", "--load", assets[1, 1], "--finetune", "--is-instruction-dataset",
                     "--data-path", prefix, "--split", "100,0,0", "--tokenizer-name-or-path", assets["tok"],
                     "--train-iters", 1, "--global-batch-size", 2, "--seq-length", seq)
    assert abs(loss - expected) < 1e-4 * expected, (loss, expected)
    assert abs(everything - expected) > 1e-2


def _pretrain_cli(*args, cwd=None):
    proc = run_module("aquila_npu.pretrain", *args, cwd=cwd, timeout=300)
    if proc.returncode == 2 and "usage:" not in proc.stderr:
        assert_one_line_error(proc.stderr)
    return proc


@pytest.mark.parametrize("args,needle", [
    (["--model", "aquila2-tiny", "--mock-data", "--train-iters", 1, "--num-layers", 8],
     "--num-layers 8 (--model aquila2-tiny: 4)"),
    (["--model", "aquila2-tiny", "--mock-data", "--train-iters", 1, "--bf16", "--fp16"], "exclude each other"),
    (["--model", "aquila2-tiny", "--train-iters", 1], "--data-path is required"),
    (["--model", "nope", "--mock-data", "--train-iters", 1], "--model nope: unknown"),
    (["--model", "aquila2-tiny", "--mock-data", "--train-iters", 1, "--no-such-flag"], "unrecognized arguments"),
    (["--model", "aquila2-tiny", "--mock-data", "--train-iters", 1, "--global-batch-size", 3,
      "--micro-batch-size", 2], "--global-batch-size 3 is not a multiple"),
    (["--mock-data", "--train-iters", 1, "--num-layers", 2], "no architecture"),
])
def test_bad_flags_are_clear_errors(args, needle):
    proc = _pretrain_cli(*args)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr[-2000:]


def test_checkpoint_layout_or_architecture_mismatch_names_the_fix(assets):
    proc = _pretrain_cli("--load", assets[2, 2], "--mock-data", "--train-iters", 1, "--tokenizer-name-or-path",
                         assets["tok"])
    assert proc.returncode == 2 and "tools/checkpoint/convert_ckpt.py" in proc.stderr
    assert "--target-tensor-parallel-size 1" in proc.stderr, proc.stderr[-2000:]
    proc = _pretrain_cli("--load", assets[1, 1], "--mock-data", "--train-iters", 1, "--hidden-size", 128)
    assert proc.returncode == 2 and "--hidden-size 128 (checkpoint: 64)" in proc.stderr
    proc = _pretrain_cli("--load", assets["dir"], "--finetune", "--mock-data", "--train-iters", 1, "--model",
                         "aquila2-tiny")
    assert proc.returncode == 2 and "no checkpoint there" in proc.stderr


def test_help_lists_the_flags_users_pass():
    out = _pretrain_cli("--help").stdout
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--sequence-parallel",
                 "--num-query-groups", "--global-batch-size", "--lr-decay-style", "--use-distributed-optimizer",
                 "--recompute-granularity", "--use-flash-attn", "--use-fused-rmsnorm", "--finetune",
                 "--is-instruction-dataset", "--no-shared-storage", "--tensorboard-dir", "--metrics-file", "--model"):
        assert flag in out, flag


TRAIN_SCRIPTS = {"pretrain_aquila2_7b_ptd.sh": ("aquila2-7b", 8, 1, False),
                 "pretrain_aquila2_34b_ptd_16p.sh": ("aquila2-34b", 8, 2, False),
                 "tune_aquila2_7b_ptd.sh": ("aquila2-7b", 8, 1, True),
                 "tune_aquila2_34b_ptd_16p.sh": ("aquila2-34b", 8, 2, True)}


@pytest.mark.parametrize("script", sorted(TRAIN_SCRIPTS))
def test_example_scripts_parse_with_the_real_parser_and_describe_the_model(script, tmp_path):
    from helpers import stub_torchrun_argv

    from aquila_npu.checkpoint.megatron_io import CheckpointInfo
    from aquila_npu.cli.pretrain import parse
    from aquila_npu.models.registry import get_model_spec
    from aquila_npu.training.config import resolve
    from aquila_npu.weights.mapping import Layout

    path = ROOT / "examples" / "aquila2" / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    launcher, module, argv = stub_torchrun_argv(path, tmp_path)
    model, tp, pp, tune = TRAIN_SCRIPTS[script]
    assert module == "aquila_npu.pretrain"
    args = parse(argv)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (tp, pp)
    assert int(launcher["--nproc_per_node"]) * int(launcher["--nnodes"]) == 16 if pp == 2 else 8
    spec = get_model_spec(model)
    # the flags agree with the published architecture (as if loading its converted checkpoint)
    converted = CheckpointInfo(args.load, 1, Layout(spec, tp, pp, 1), torch.bfloat16, trained=False)
    cfg = resolve(args, converted, None, tp * pp)
    assert cfg.spec == spec and cfg.layout.make_vocab_size_divisible_by == 1
    assert args.load.endswith(f"-tp{tp}-pp{pp}/") and args.save
    assert (args.finetune, args.is_instruction_dataset) == (tune, tune)
    assert args.data_path == ([f"./finetune_dataset/Aquila2-{model[8:].upper()}/alpaca"] if tune else
                              [f"./dataset/Aquila2-{model[8:].upper()}/alpaca_text_document"])


@pytest.mark.slow
def test_tiny_cpu_script_trains_and_saves(tmp_path):
    env = child_env(CKPT_SAVE_DIR=tmp_path / "ck", TRAIN_ITERS=4, MASTER_PORT=free_port())
    proc = subprocess.run(["bash", str(ROOT / "examples/aquila2/pretrain_aquila2_tiny_cpu.sh"), "--log-interval", "1"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "iteration        4/       4" in proc.stdout
    assert (tmp_path / "ck/iter_0000004/mp_rank_01/model_optim_rng.pt").exists()
