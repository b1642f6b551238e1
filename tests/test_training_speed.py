"""Training speed features (issue 14) change no loss: overlapped gradient reduction and parameter all-gather
(dp2, distributed optimizer, 2 micro-batches per step), one causal mask (SDPA's own causal mode, or one shared mask
tensor), and no device-to-host sync per gradient tensor or per layer inside a step."""

import json

import numpy as np
import pytest
import torch

from helpers import TRAIN_SEQ, SyncCounter, adam_steps, torchrun, trainer

from aquila_npu.checkpoint import megatron_io
from aquila_npu.compat import journal
from aquila_npu.compat import megatron_core as compat_mcore
from aquila_npu.device.torch_modules import CoreAttentionBase, SDPAAttention, shared_causal_mask
from aquila_npu.errors import UsageError

SEQ = TRAIN_SEQ


# ------------------------------------------------------------------------------------------- in-process training


def _losses(step, n=3):
    return [(out["lm_loss"], out["grad_norm"]) for out in (step() for _ in range(n))]


# ------------------------------------------------------------------------------------------ 2. one causal mask


def test_sdpa_causal_mode_trains_exactly_as_the_explicit_mask(cpu_device, monkeypatch):
    """The plain path now passes no mask (SDPA is_causal); the losses and gradient norms of three steps are the
    ones of the explicit [S, S] mask, bit for bit."""
    causal = _losses(trainer(cpu_device)[0])
    monkeypatch.setattr(SDPAAttention, "needs_causal_mask", True)  # the explicit mask, as before
    explicit = _losses(trainer(cpu_device)[0])
    assert causal == explicit
    assert len({loss for loss, _ in causal}) == 3  # the weights move


def _saved_square_tensors(model, seq):
    """The [.., S, S]-sized tensors one forward pass saves for backward, as (data_ptr, numel)."""
    saved = []

    def pack(t):
        if t.numel() > 0 and t.numel() % (seq * seq) == 0 and tuple(t.shape[-2:]) == (seq, seq):
            saved.append((t.untyped_storage().data_ptr(), t.numel()))
        return t

    tokens = torch.randint(0, 1000, (1, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, torch.arange(seq)[None], None, labels=tokens).sum()
    return saved


def test_one_causal_mask_per_shape_and_device(cpu_device, monkeypatch):
    """SDPA keeps no [S, S] tensor for backward at all; a kernel that takes a mask gets one tensor, shared by every
    layer and micro-batch (before: a new mask per layer and micro-batch, each kept for backward)."""
    seq = 40  # no weight is [40, 40]
    _, model, _, _ = trainer(cpu_device)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append((kw.get("attn_mask"), kw.get("is_causal"))) or sdpa(*a, **kw))
    saved_causal = _saved_square_tensors(model, seq)
    assert calls and all(mask is None and causal for mask, causal in calls), calls  # SDPA's causal mode, no mask
    if torch.__version__ >= "2.8":  # torch 2.6's CPU SDPA has no flash path with GQA: its math path keeps the weights
        assert saved_causal == []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    masks = []
    attend = SDPAAttention.attend
    monkeypatch.setattr(SDPAAttention, "needs_causal_mask", True)  # how a mask-taking kernel is served
    monkeypatch.setattr(SDPAAttention, "attend", lambda self, q, k, v, mask, *a: masks.append(mask) or
                        attend(self, q, k, v, mask, *a))
    saved = [_saved_square_tensors(model, seq) for _ in range(2)]  # two micro-batches
    layers = len([m for m in model.modules() if isinstance(m, CoreAttentionBase)])
    assert all(len(s) >= layers for s in saved)  # what SDPA keeps with a mask: the detector above works
    assert len(masks) == 2 * layers and all(m is masks[0] for m in masks)
    assert masks[0] is shared_causal_mask(seq, seq, torch.device("cpu"))
    assert masks[0].tolist() == torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1).tolist()
    with torch.inference_mode():  # built while generating, still usable by a later backward pass
        mask = shared_causal_mask(5, 5, torch.device("cpu"))
    assert not mask.is_inference()


# ------------------------------------------------------------------------------------ 3. syncs inside one step

def _syncs_per_step(dev, layers, *extra):
    step, _, optimizer, _ = trainer(dev, layers, *extra)
    step()  # the first step creates the optimizer state
    with SyncCounter(adam_steps(optimizer)) as counter:
        step()
    return counter


def test_syncs_per_step_do_not_grow_with_layers(cpu_device, monkeypatch):
    """One step of megatron-core's schedule and optimizer: as many host syncs with 2 layers as with 4 (the gradient
    norm's one, megatron-core's token-count check, and the logged loss); megatron-core's own fallback norm kernel
    adds one per gradient tensor, which this test sees."""
    assert "grad-norm" in journal.applied()  # setup() installed the on-device gradient norm
    two, four = (_syncs_per_step(cpu_device, n) for n in (2, 4))
    assert two.calls == four.calls and 0 < two.total <= 4, (two.calls, four.calls)

    from megatron.core.optimizer import clip_grads
    from megatron.core.utils import local_multi_tensor_l2_norm

    monkeypatch.setattr(clip_grads, "l2_norm_impl", local_multi_tensor_l2_norm)  # megatron-core's fallback
    two, four = (_syncs_per_step(cpu_device, n) for n in (2, 4))
    assert four.total > two.total > 4  # the counter sees the per-tensor syncs


def test_rng_tracker_is_forked_only_with_attention_dropout(cpu_device, monkeypatch):
    from megatron.core.tensor_parallel import random as mcore_random

    forks = []
    fork = mcore_random.CudaRNGStatesTracker.fork
    monkeypatch.setattr(mcore_random.CudaRNGStatesTracker, "fork",
                        lambda self, *a, **k: forks.append(1) or fork(self, *a, **k))
    trainer(cpu_device, 2)[0]()
    assert forks == []
    trainer(cpu_device, 2, "--attention-dropout", "0.1")[0]()
    assert len(forks) == 2 * 2  # every layer, every micro-batch


def test_on_device_grad_norm_is_megatrons_number_and_undoable():
    from megatron.core.optimizer import clip_grads
    from megatron.core.utils import local_multi_tensor_l2_norm

    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, generator=g) * 10.0 ** e for n, e in ((7, -3), (4096, 0), (300, 2), (1, 1))]
    flag = torch.zeros(1, dtype=torch.int)
    ours, _ = compat_mcore.l2_norm_on_device(65536, flag, [tensors], False)
    theirs, _ = local_multi_tensor_l2_norm(65536, flag, [tensors], False)
    assert torch.equal(ours, theirs)
    installed = "grad-norm" in journal.applied()
    journal.undo_all()
    try:
        assert clip_grads.l2_norm_impl is local_multi_tensor_l2_norm
        compat_mcore.grad_norm_without_host_syncs()
        assert clip_grads.l2_norm_impl is compat_mcore.l2_norm_on_device and "grad-norm" in journal.applied()
    finally:
        journal.undo_all()
    assert clip_grads.l2_norm_impl is local_multi_tensor_l2_norm
    compat_mcore.redirect_cuda_to_cpu()  # leave the process as the other tests expect it
    if installed:
        compat_mcore.grad_norm_without_host_syncs()


# ------------------------------------------------------------------------ 1. overlapped communication (flags)


def _parse(*flags):
    from aquila_npu.cli.pretrain import parser, validate

    args = parser().parse_args(["--mock-data", "--train-iters", "1", *flags])
    validate(args)
    return args


def test_ddp_flags_default_to_todays_behaviour_and_reach_megatron_core():
    from aquila_npu.training.run import ddp_config

    default = ddp_config(_parse())
    assert (default.grad_reduce_in_fp32, default.overlap_grad_reduce, default.overlap_param_gather,
            default.bucket_size) == (True, False, False, None)
    on = ddp_config(_parse("--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
                           "--ddp-bucket-size", "1000", "--no-accumulate-allreduce-grads-in-fp32"))
    assert (on.grad_reduce_in_fp32, on.overlap_grad_reduce, on.overlap_param_gather, on.bucket_size,
            on.use_distributed_optimizer) == (False, True, True, 1000, True)
    assert ddp_config(_parse("--accumulate-allreduce-grads-in-fp32")).grad_reduce_in_fp32
    for flags, needle in ((["--overlap-param-gather", "--overlap-grad-reduce"], "--use-distributed-optimizer"),
                          (["--overlap-param-gather", "--use-distributed-optimizer"], "--overlap-grad-reduce"),
                          (["--ddp-bucket-size", "0"], "--ddp-bucket-size")):
        with pytest.raises(UsageError, match=needle):
            _parse(*flags)


def _metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_overlapped_grad_reduce_and_param_gather_change_no_loss(tmp_path):
    """dp2, distributed optimizer, 2 micro-batches per rank and step, buckets of 20k parameters (aquila2-tiny has
    ~0.3 M: many buckets, each reduced while backward goes on), evaluation and a checkpoint in between: the same
    losses, gradient norms, validation losses and saved weights as without overlap."""
    common = ["--model", "aquila2-tiny", "--mock-data", "--train-iters", 4, "--micro-batch-size", 2,
              "--global-batch-size", 8, "--seq-length", SEQ, "--lr", 1e-3, "--lr-decay-style", "constant",
              "--use-distributed-optimizer", "--log-interval", 1, "--eval-interval", 2, "--eval-iters", 1,
              "--save-interval", 3]
    runs = {}
    for name, flags in (("plain", []), ("overlap", ["--overlap-grad-reduce", "--overlap-param-gather",
                                                    "--ddp-bucket-size", 20000])):
        torchrun("-m aquila_npu.pretrain", 2, [*common, "--metrics-file", tmp_path / f"{name}.jsonl",
                                               "--save", tmp_path / name, *flags])
        runs[name] = _metrics(tmp_path / f"{name}.jsonl")
    for key in ("lm_loss", "grad_norm", "validation_lm_loss"):
        a, b = (np.array([r[key] for r in runs[n] if key in r]) for n in ("plain", "overlap"))
        assert len(a) == len(b) > 0 and np.max(np.abs(a - b) / np.abs(a)) < 1e-5, (key, a, b)
    for iteration in (3, 4):  # saved mid-run and at the end: every rank's parameters gathered first
        a, b = (megatron_io.load_rank(str(tmp_path / n), iteration, 0, 0, 1)["model"] for n in ("plain", "overlap"))
        assert a.keys() == b.keys()
        for k in a:
            if torch.is_tensor(a[k]):
                torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)


def test_benchmark_toggles_megatrons_overlap_flags():
    from aquila_npu.benchmarking.run import overlap_toggled

    assert overlap_toggled(["--bf16"]) == ["--bf16", "--overlap-grad-reduce"]
    assert overlap_toggled(["--use-distributed-optimizer"]) == \
        ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]
    on = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather", "--ddp-bucket-size", "9"]
    assert overlap_toggled(on) == ["--use-distributed-optimizer", "--ddp-bucket-size", "9"]
