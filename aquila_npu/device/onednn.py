"""fp32 matrix products of inference on the CPU through oneDNN instead of torch's default BLAS.

On the CPU torch computes an fp32 ``F.linear`` with its BLAS (MKL in the x86 wheels); bf16 already goes to oneDNN.
On the AMD EPYC machines we measured (docs/inference.md) MKL's sgemm runs at half oneDNN's speed or less for every
shape of these models, from one row (a decoding step: 2.9x) to thousands (a prefill: 1.8x), and does not use the
second core for one row. torch ships oneDNN's linear as ``torch.ops.mkldnn._linear_pointwise`` (the op torch's own
compiler emits for CPU linears); it takes the plain [out, in] weight, so nothing is copied or repacked and no memory
is added. Written here because no maintained library offers a different CPU GEMM for an eager megatron-core model.

Only what runs without autograd takes this route (generation, evaluation, validation): training keeps
megatron-core's autograd functions. The results are fp32 products summed in another order (relative differences of
about 1e-6; generation stays token-identical to Hugging Face's, tests/test_generate.py).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def available() -> bool:
    """Whether this torch build has oneDNN and its linear op."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def takes(input: Tensor, weight: Tensor) -> bool:
    """Whether ``linear(input, weight)`` applies: fp32 CPU tensors outside autograd."""
    return (not torch.is_grad_enabled() and weight.dtype == torch.float32 and input.dtype == torch.float32
            and weight.device.type == "cpu" and input.device.type == "cpu" and weight.dim() == 2)


def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(input, weight, bias)`` computed by oneDNN (input [..., in], weight [out, in])."""
    return torch.ops.mkldnn._linear_pointwise(input, weight, bias, "none", [], "")
