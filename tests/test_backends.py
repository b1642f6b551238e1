"""Backends: same parameter names and shapes everywhere; fused switches that a device cannot honour are errors."""

import pytest
import torch

from aquila_npu.compat import journal
from aquila_npu.compat import megatron_core as compat_mcore
from aquila_npu.device.backends import CpuBackend, CudaBackend, FusedOps, NpuBackend, have_transformer_engine
from aquila_npu.device.setup import resolve, setup
from aquila_npu.errors import DeviceUnavailable, FusedKernelUnavailable, UsageError
from aquila_npu.models.config import transformer_config
from aquila_npu.models.gpt import build_model
from aquila_npu.testing.npu import ops as npu_ops
from aquila_npu.testing.tiny_hf import TINY
from aquila_npu.weights.mapping import Layout, mcore_param_names


def _state_shapes(backend):
    cfg = transformer_config(TINY, **backend.config_overrides())
    model = build_model(TINY, cfg, backend, padded_vocab=Layout(TINY, make_vocab_size_divisible_by=8).padded_vocab)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("_extra_state")}, model


def test_state_dict_identical_for_cpu_npu_cuda(cpu_device):
    cpu, _ = _state_shapes(CpuBackend())
    with npu_ops.installed():
        npu_backend = NpuBackend(FusedOps.all())
        compat_mcore.provide_fused_rope(npu_backend.rope_fn())  # what setup() does for this backend
        npu, npu_model = _state_shapes(npu_backend)
    cuda_fused = FusedOps(swiglu=True) if not have_transformer_engine() else FusedOps.all()
    cuda, _ = _state_shapes(CudaBackend(cuda_fused))
    assert cpu == npu == cuda
    # and they are exactly the names of the weight-mapping table
    assert sorted(cpu) == sorted(mcore_param_names(Layout(TINY), 0))
    # the npu model really is built from the fused modules
    kinds = {type(m).__name__ for m in npu_model.modules()}
    assert {"NpuRMSNorm", "NpuFlashAttention", "NpuSwiGLU"} <= kinds


def test_cpu_rejects_fused_switches():
    with pytest.raises(FusedKernelUnavailable, match="--use-flash-attn.*cpu"):
        CpuBackend(FusedOps(flash_attn=True))
    with pytest.raises(FusedKernelUnavailable, match="--use-fused-rmsnorm, --use-fused-swiglu"):
        setup("cpu", FusedOps(rmsnorm=True, swiglu=True), distributed=False)


@pytest.mark.skipif(have_transformer_engine(), reason="Transformer Engine is installed")
def test_cuda_without_transformer_engine_is_a_clear_error():
    with pytest.raises(FusedKernelUnavailable, match="Transformer Engine"):
        CudaBackend(FusedOps(flash_attn=True))


def test_device_selection_errors(monkeypatch):
    with pytest.raises(UsageError, match="--device"):
        resolve("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailable, match="no CUDA"):
            resolve("cuda")
    with pytest.raises(DeviceUnavailable, match="torch_npu"):
        resolve("npu")
    monkeypatch.setenv("AQUILA_DEVICE", "cpu")
    assert resolve() == "cpu"


def test_fused_ops_from_modellink_args():
    class Args:
        use_fused_rmsnorm, use_flash_attn, use_fused_rotary_pos_emb, use_fused_swiglu = True, True, False, True

    ops = FusedOps.from_args(Args)
    assert ops.requested() == ["--use-fused-rmsnorm", "--use-flash-attn", "--use-fused-swiglu"]


def test_patches_are_opt_in_and_undoable():
    """The cpu redirection and the fused-RoPE slot install and uninstall cleanly; megatron-core sees CUDA type names."""
    journal.undo_all()
    from megatron.core.models.common.embeddings import rope_utils

    original = rope_utils.fused_apply_rotary_pos_emb
    assert torch.randn(2).type() == "torch.FloatTensor"
    compat_mcore.redirect_cuda_to_cpu()
    compat_mcore.provide_fused_rope(lambda t, f: t)
    try:
        assert journal.applied() == {"cpu", "rope"}
        assert torch.randn(2).type() == "torch.cuda.FloatTensor"
        assert torch.randn(2).type(torch.float64).dtype == torch.float64
        assert torch.zeros(3, device="cuda").device.type == "cpu"
        assert rope_utils.fused_apply_rotary_pos_emb is not original
    finally:
        journal.undo_all()
    assert rope_utils.fused_apply_rotary_pos_emb is original
    assert torch.randn(2).type() == "torch.FloatTensor"
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")
    compat_mcore.redirect_cuda_to_cpu()  # leave the process as the other tests expect it


def test_fused_rope_slot_serves_only_configs_that_ask_for_fusion():
    from megatron.core.transformer import attention

    compat_mcore.provide_fused_rope(lambda t, f: t * 0 + 7)
    try:
        t, freqs = torch.randn(5, 1, 2, 8), torch.randn(5, 1, 1, 8)
        plain = attention.apply_rotary_pos_emb(t, freqs, config=transformer_config(TINY))
        assert not (plain == 7).all()
        fused = transformer_config(TINY, apply_rope_fusion=True)  # what NpuBackend.config_overrides() sets
        assert (attention.apply_rotary_pos_emb(t, freqs, config=fused) == 7).all()
    finally:
        journal.undo_all()
        compat_mcore.redirect_cuda_to_cpu()
    with npu_ops.installed():
        from aquila_npu.device.npu_modules import npu_rope
        assert torch.allclose(npu_rope(t, freqs), plain, atol=1e-6)
