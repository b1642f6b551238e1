"""Each fused Ascend op, as our modules call it, against the plain-PyTorch path it replaces: forward output and
backward gradients (inputs and parameters), in bf16 and fp16, relative to the plain path computed in fp32 from the
same rounded inputs.

Error = max |fused - reference| / max |reference|. Tolerances: a few units of the dtype's rounding (bf16 has 8
significant bits, fp16 11), which the plain path in that dtype also meets.
"""

from __future__ import annotations

from typing import Callable, List, Sequence

import torch
import torch.nn.functional as F

TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.detach().float()
    return ((a.detach().float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def compare(name: str, dtype: torch.dtype, fused: Callable, plain: Callable, inputs: Sequence[torch.Tensor],
            fused_params: Sequence[torch.Tensor] = (), plain_params: Sequence[torch.Tensor] = ()) -> dict:
    """``fused(*inputs in dtype)`` vs ``plain(*the same values in fp32)``, forward and backward."""
    xs = [t.detach().to(dtype).requires_grad_() for t in inputs]
    rs = [x.detach().float().requires_grad_() for x in xs]
    out, ref = fused(*xs), plain(*rs)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7)).to(ref.device)
    out.backward(grad.to(out.dtype))
    ref.backward(grad)
    bwd = [rel_err(x.grad, r.grad) for x, r in zip(list(xs) + list(fused_params), list(rs) + list(plain_params))]
    tol = TOLERANCE[dtype]
    result = {"op": name, "dtype": str(dtype).replace("torch.", ""), "forward": rel_err(out, ref),
              "backward": max(bwd), "tolerance": tol}
    result["ok"] = result["forward"] <= tol and result["backward"] <= tol
    return result


def run(dev, dtypes: List[str] = ("bf16", "fp16")) -> List[dict]:
    """Every fused module of the npu backend vs its plain counterpart (``dev``: an npu ``Device`` with
    megatron-core's model-parallel state initialised, tp 1)."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.transformer.enums import AttnMaskType

    from aquila_npu.device import npu_modules, torch_modules
    from aquila_npu.models.config import transformer_config
    from aquila_npu.models.registry import ModelSpec

    spec = ModelSpec("ops-check", hidden_size=512, intermediate_size=1024, num_layers=1, num_attention_heads=8,
                     num_key_value_heads=4, vocab_size=128, max_position_embeddings=256)
    s, b, d = 128, 2, spec.head_dim
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(dev.torch_device)

    results = []
    for name in dtypes:
        dtype = DTYPES[name]
        cfg = transformer_config(spec, params_dtype=dtype, use_cpu_initialization=False)
        ref_cfg = transformer_config(spec, params_dtype=torch.float32, use_cpu_initialization=False)
        fused_norm = npu_modules.NpuRMSNorm(cfg, spec.hidden_size, eps=spec.rms_norm_eps).to(dev.torch_device)
        plain_norm = torch_modules.RMSNorm(ref_cfg, spec.hidden_size, eps=spec.rms_norm_eps).to(dev.torch_device)
        with torch.no_grad():
            fused_norm.weight.copy_(1 + 0.1 * rand(spec.hidden_size))
            plain_norm.weight.copy_(fused_norm.weight.float())
        results.append(compare("npu_rms_norm (--use-fused-rmsnorm)", dtype, fused_norm, plain_norm,
                               [rand(s, b, spec.hidden_size)], [fused_norm.weight], [plain_norm.weight]))

        fused_attn = npu_modules.NpuFlashAttention(cfg, 1, AttnMaskType.causal, "self")
        plain_attn = torch_modules.SDPAAttention(ref_cfg, 1, AttnMaskType.causal, "self")
        heads, groups = spec.num_attention_heads, spec.num_key_value_heads
        results.append(compare("npu_fusion_attention (--use-flash-attn)", dtype,
                               lambda q, k, v: fused_attn(q, k, v, None), lambda q, k, v: plain_attn(q, k, v, None),
                               [rand(s, b, heads, d), rand(s, b, groups, d), rand(s, b, groups, d)]))

        inv = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2).float() / d))
        angles = torch.outer(torch.arange(s).float(), inv)
        freqs = torch.cat((angles, angles), dim=-1)[:, None, None, :].to(dev.torch_device)
        # the fused path gets megatron-core's strided q view (as after the QKV split), the reference a plain tensor
        results.append(compare("npu_rotary_mul (--use-fused-rotary-pos-emb)", dtype,
                               lambda t: npu_modules.npu_rope(t.transpose(0, 1).contiguous().transpose(0, 1), freqs),
                               lambda t: apply_rotary_pos_emb(t, freqs, ref_cfg), [rand(s, b, heads, d)]))

        swiglu = npu_modules.NpuSwiGLU()
        results.append(compare("npu_swiglu (--use-fused-swiglu)", dtype, swiglu,
                               lambda x: F.silu(x.chunk(2, -1)[0]) * x.chunk(2, -1)[1],
                               [rand(s, b, 2 * spec.intermediate_size)]))
    return results
