"""CPU inference linears on oneDNN (compat.torch.onednn_linear, compat.megatron_core.cpu_inference_linears_on_onednn).

References: plain ``F.linear`` for the products, megatron-core's own linears (unpatched) for the layers' outputs and
gradients. The route is observed through the torch profiler: oneDNN's op where it applies, aten's matmul elsewhere.
"""

import pytest
import torch
import torch.nn.functional as F

from aquila_npu.compat import journal
from aquila_npu.compat import megatron_core as compat_mcore
from aquila_npu.compat import torch as compat_torch
from aquila_npu.models.config import transformer_config
from aquila_npu.testing.tiny_hf import TINY

pytestmark = pytest.mark.skipif(not compat_torch.onednn_available(), reason="this torch build has no oneDNN")


def _ops(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("shape", [(1, 1, 64), (7, 3, 64), (0, 2, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_f_linear(shape, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(96, 64, generator=g)
    b = torch.randn(96, generator=g) if bias else None
    with torch.no_grad():
        ours = compat_torch.onednn_linear(x, w, b)
    torch.testing.assert_close(ours, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    # a non-contiguous input (a slice of a wider activation)
    wide = torch.randn(5, 128, generator=g)[:, ::2]
    with torch.no_grad():
        torch.testing.assert_close(compat_torch.onednn_linear(wide, w, b), F.linear(wide, w, b), rtol=1e-5, atol=1e-5)


def test_takes_only_fp32_cpu_tensors_outside_autograd():
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    assert not compat_mcore.takes_onednn(x, w)  # autograd is on
    with torch.no_grad():
        assert compat_mcore.takes_onednn(x, w)
        assert not compat_mcore.takes_onednn(x.bfloat16(), w.bfloat16())
        assert not compat_mcore.takes_onednn(x.double(), w.double())
    with torch.inference_mode():
        assert compat_mcore.takes_onednn(x, w)


def test_megatron_linears_route_inference_to_onednn(cpu_device):
    """Column- and row-parallel linears (as the model and GPTModel's output layer build them): outside autograd
    the patched layers give megatron-core's outputs through oneDNN's op; with autograd the same outputs and
    gradients through megatron-core's own functions."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    assert "onednn-linear" in journal.applied()  # setup("cpu") installed it
    config = transformer_config(TINY)
    torch.manual_seed(0)
    layers = [ColumnParallelLinear(64, 96, config=config, init_method=torch.nn.init.normal_, bias=True,
                                   gather_output=True),
              RowParallelLinear(64, 96, config=config, init_method=torch.nn.init.normal_, bias=False,
                                input_is_parallel=True, skip_bias_add=True)]
    x = torch.randn(5, 2, 64)
    for layer in layers:
        with torch.inference_mode():
            (ours, _), ops = _ops(lambda: layer(x))
        assert "mkldnn::_linear_pointwise" in ops and not {"aten::mm", "aten::matmul", "aten::addmm"} & ops
        bias = layer.bias if not layer.skip_bias_add else None
        torch.testing.assert_close(ours, F.linear(x, layer.weight, bias), rtol=1e-5, atol=1e-5)

        xg = x.clone().requires_grad_()
        (trained, _), ops = _ops(lambda: layer(xg))
        assert "mkldnn::_linear_pointwise" not in ops
        trained.sum().backward()
        journal.undo_all()  # megatron-core's own layers, for the reference
        try:
            xr = x.clone().requires_grad_()
            grad_w, layer.weight.grad = layer.weight.grad.clone(), None
            ref, _ = layer(xr)
            ref.sum().backward()
            with torch.inference_mode():
                (plain, _), ops = _ops(lambda: layer(x))
            assert "mkldnn::_linear_pointwise" not in ops
        finally:
            compat_mcore.redirect_cuda_to_cpu()
            compat_mcore.cpu_inference_linears_on_onednn()
        torch.testing.assert_close(trained, ref)
        torch.testing.assert_close(xg.grad, xr.grad)
        torch.testing.assert_close(grad_w, layer.weight.grad)
        torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
