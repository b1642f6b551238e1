"""The optimizer is chosen by us, not by what megatron-core finds importable (issue 13 §4): torch AdamW on every
device (fused where the device has the kernel), equal to torch's reference AdamW, and training survives an Apex
without CUDA extensions (the stand-in in tests/fixtures/apex_without_cuda raises in FusedAdam's constructor, as
Apex does)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import ROOT, child_env, torchrun

from aquila_npu.compat import journal
from aquila_npu.compat import megatron_core as compat_mcore
from aquila_npu.training import adam

BROKEN_APEX = ROOT / "tests" / "fixtures" / "apex_without_cuda"


def test_each_device_gets_torch_adamw_fused_where_it_has_the_kernel():
    assert adam.for_device("npu") == adam.for_device("cuda") == adam.AdamW(fused=True)
    assert adam.for_device("cpu") == adam.AdamW(fused=False)
    p = [torch.nn.Parameter(torch.ones(3))]
    built = adam.AdamW(fused=False)(p, lr=0.1, weight_decay=0.01, betas=(0.9, 0.95), eps=1e-8)
    assert type(built) is torch.optim.AdamW and built.defaults["betas"] == (0.9, 0.95)
    assert not built.defaults["fused"]
    assert type(adam.AdamW(fused=False)(p, lr=0.1, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8,
                                        adam_w_mode=False)) is torch.optim.Adam


def _ours(device_name):
    return lambda config, chunks: adam.get_megatron_optimizer(config, chunks, device_name)


def _tiny_run(build, use_distributed_optimizer, bf16, steps=3):
    """Losses of ``steps`` iterations of the tiny model on this CPU with the optimizer ``build(config, chunks)``
    returns, and its inner optimizer."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from aquila_npu.device.backends import CpuBackend
    from aquila_npu.models.config import transformer_config
    from aquila_npu.models.gpt import build_model
    from aquila_npu.testing.tiny_hf import TINY
    from aquila_npu.training.batches import MockDataset, micro_batches
    from aquila_npu.training.step import train_step
    from aquila_npu.weights.mapping import Layout

    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(0)
    cfg = transformer_config(TINY, params_dtype=dtype, use_cpu_initialization=True, calculate_per_token_loss=True)
    vocab = Layout(TINY).padded_vocab
    model = build_model(TINY, cfg, CpuBackend(), padded_vocab=vocab, max_sequence_length=64)
    ddp = DistributedDataParallel(config=cfg, module=model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=use_distributed_optimizer))
    cfg.no_sync_func = ddp.no_sync
    optimizer = build(OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
                                      clip_grad=1.0, bf16=bf16, params_dtype=dtype,
                                      use_distributed_optimizer=use_distributed_optimizer), [ddp])

    class ConstantLR:
        def step(self, increment):
            pass

    data = micro_batches(MockDataset(steps * 2, 16, TINY.vocab_size, seed=1), consumed_samples=0,
                         micro_batch_size=2, dp_rank=0, dp_size=1)
    losses = [train_step(data, ddp, optimizer, ConstantLR(), num_microbatches=1, seq_length=16, micro_batch_size=2,
                         global_batch_size=2)["lm_loss"] for _ in range(steps)]
    return losses, optimizer.optimizer


@pytest.mark.parametrize("use_distributed_optimizer,bf16", [(False, False), (True, False), (True, True)],
                         ids=["fp32", "fp32-distributed-optimizer", "bf16-distributed-optimizer"])
def test_fused_adamw_trains_as_torch_reference_adamw(cpu_device, use_distributed_optimizer, bf16):
    """The NPU / CUDA choice (torch's fused AdamW kernel; here its CPU kernel) inside megatron-core's wrappers gives
    the losses of torch's single-tensor AdamW (the CPU choice)."""
    try:
        reference, inner_ref = _tiny_run(_ours("cpu"), use_distributed_optimizer, bf16)
        fused, inner_fused = _tiny_run(_ours("npu"), use_distributed_optimizer, bf16)
    finally:
        journal.undo_all()
        compat_mcore.redirect_cuda_to_cpu()  # what cpu_device installed, for the module's later tests
    assert type(inner_ref) is type(inner_fused) is torch.optim.AdamW
    assert not inner_ref.defaults["fused"] and inner_fused.defaults["fused"]
    assert len(set(reference)) == 3  # the weights move
    np.testing.assert_allclose(fused, reference, rtol=1e-5 if not bf16 else 1e-3)


def test_megatron_with_apex_fused_adam_dies_and_use_adam_fixes_it(cpu_device, monkeypatch):
    """What megatron-core does after importing an Apex whose FusedAdam raises (its import-time choice set by hand
    here; the training test below imports the stand-in for real): its own builder dies, ours builds torch AdamW and
    tells the distributed optimizer so; undo_all() restores megatron-core's choice."""
    import megatron.core.optimizer as mcore_optimizer
    from megatron.core.optimizer import distrib_optimizer

    sys.path.insert(0, str(BROKEN_APEX))
    try:
        from apex.optimizers import FusedAdam
    finally:
        sys.path.remove(str(BROKEN_APEX))
    monkeypatch.setattr(mcore_optimizer, "Adam", FusedAdam)
    monkeypatch.setattr(mcore_optimizer, "USING_PYTORCH_OPTIMIZER", False)
    monkeypatch.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", True)
    monkeypatch.setattr(distrib_optimizer, "USING_APEX_OPTIMIZER", True)
    with pytest.raises(RuntimeError, match="requires cuda extensions"):
        _tiny_run(mcore_optimizer.get_megatron_optimizer, True, False, steps=1)
    try:
        losses, inner = _tiny_run(_ours("cpu"), True, False, steps=2)
        assert type(inner) is torch.optim.AdamW and len(losses) == 2
        assert not distrib_optimizer.HAVE_APEX_OR_TE and not distrib_optimizer.USING_APEX_OPTIMIZER
        assert "adam" in journal.applied()
    finally:
        journal.undo_all()  # before monkeypatch restores megatron-core's real choice
        compat_mcore.redirect_cuda_to_cpu()
    assert mcore_optimizer.Adam is FusedAdam and distrib_optimizer.USING_APEX_OPTIMIZER


def _metrics(path):
    with open(path) as f:
        return [json.loads(line)["lm_loss"] for line in f if "lm_loss" in line]


@pytest.mark.slow
@pytest.mark.parametrize("nproc,flags", [
    pytest.param(1, [], id="single-process"),
    pytest.param(2, ["--use-distributed-optimizer", "--bf16"], id="dp2-distributed-optimizer-bf16",
                 marks=pytest.mark.oldest_torch)])
def test_training_runs_with_an_apex_without_cuda_extensions(tmp_path, nproc, flags, monkeypatch):
    """Same losses with the broken Apex on the path as without it; with the distributed optimizer also across a
    save and resume (its checkpoint code would otherwise treat our torch AdamW as Apex's FusedAdam)."""
    probe = subprocess.run([sys.executable, "-c", "import megatron.core.optimizer as o; print(o.Adam.__module__, "
                            "o.USING_PYTORCH_OPTIMIZER)"], env=child_env(PYTHONPATH=BROKEN_APEX), capture_output=True,
                           text=True, timeout=300)
    assert probe.stdout.split() == ["apex.optimizers", "False"], probe.stderr[-2000:]  # megatron-core picks it
    args = ["--model", "aquila2-tiny", "--mock-data", "--micro-batch-size", 2, "--global-batch-size", 4,
            "--seq-length", 32, "--train-iters", 3, "--lr", 1e-3, "--lr-decay-style", "constant", "--log-interval",
            1, "--eval-interval", 1000, *flags]

    def train(name, *extra):
        proc = torchrun("-m aquila_npu.pretrain", nproc, [*args, "--metrics-file", tmp_path / f"{name}.jsonl", *extra])
        assert "optimizer torch.optim.AdamW (single-tensor)" in proc.stdout, proc.stdout[-2000:]
        return _metrics(tmp_path / f"{name}.jsonl")

    plain = train("plain")
    assert len(plain) == 3 and len(set(plain)) == 3
    monkeypatch.setenv("PYTHONPATH", str(BROKEN_APEX))  # child_env() puts the checkout in front of it
    if nproc == 1:
        assert train("apex") == plain  # bit for bit: the same torch AdamW
    else:
        ck = tmp_path / "ck"
        first = train("apex-first", "--save", ck, "--save-interval", 2, "--exit-interval", 2)
        resumed = train("apex-resumed", "--load", ck)
        assert first + resumed == plain, (first, resumed, plain)
