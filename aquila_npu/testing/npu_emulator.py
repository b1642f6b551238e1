"""A stand-in ``torch_npu`` for tests on machines without an Ascend NPU.

It implements only the ops aquila_npu calls, in plain torch, with the real signatures (argument names and defaults as
in torch_npu 2.13.0's ``op_plugin/meta/_meta_registrations.py``), layouts, mask conventions and return values.
Results prove API use and numerics, never speed.

    with npu_emulator.installed():
        ...  # import torch_npu gives this module

Only the paths we use are emulated; anything else raises NotImplementedError rather than guessing.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib.machinery
import math
import sys
import types

import torch
import torch.nn.functional as F
from torch import Tensor

EMULATED_OPS = ("npu_rms_norm", "npu_fusion_attention", "npu_rotary_mul", "npu_swiglu", "npu_apply_adam_w")


def npu_rms_norm(self: Tensor, gamma: Tensor, epsilon: float = 1e-6):
    """Returns ``(y, rstd)``: y = x * rstd * gamma (computed in fp32, cast to x's dtype); rstd is fp32 and keeps
    the leading dims of x that gamma does not cover (size 1 elsewhere)."""
    x = self.float()
    dims = tuple(range(self.dim() - gamma.dim(), self.dim()))
    rstd = torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    y = (x * rstd * gamma.float()).to(self.dtype)
    return y, rstd


def npu_swiglu(x: Tensor, dim: int = -1) -> Tensor:
    """silu(first half) * second half along ``dim`` (fp32 math, output in x's dtype)."""
    a, b = x.float().chunk(2, dim=dim)
    return (F.silu(a) * b).to(x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_interleave(x: Tensor) -> Tensor:
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def npu_rotary_mul(embedding: Tensor, cosine: Tensor, sine: Tensor, mode: str = "half", rotate=None) -> Tensor:
    """x * cos + rotate(x) * sin for 4-D x; cos/sin broadcast to x. mode 'half' (rotate-half, as LLaMA/Aquila)
    or 'interleave'."""
    if embedding.dim() != 4:
        raise RuntimeError(f"npu_rotary_mul expects a 4-D input, got {embedding.dim()}-D")
    if rotate is not None:
        raise NotImplementedError("npu_rotary_mul(rotate=...) is not emulated")
    rot = {"half": _rotate_half, "interleave": _rotate_interleave}.get(mode)
    if rot is None:
        raise NotImplementedError(f"npu_rotary_mul mode {mode!r} is not emulated")
    x = embedding.float()
    return (x * cosine.float() + rot(x) * sine.float()).to(embedding.dtype)


def _to_bnsd(t: Tensor, layout: str, heads: int = 0) -> Tensor:
    if layout == "BNSD":
        return t
    if layout == "BSND":
        return t.transpose(1, 2)
    if layout in ("SBH", "BSH"):
        if layout == "SBH":
            t = t.transpose(0, 1)  # [B, S, H]
        b, s, h = t.shape
        return t.reshape(b, s, heads, h // heads).transpose(1, 2)
    raise NotImplementedError(f"input_layout {layout!r} is not emulated")


def _from_bnsd(t: Tensor, layout: str) -> Tensor:
    if layout == "BNSD":
        return t
    if layout == "BSND":
        return t.transpose(1, 2)
    b, n, s, d = t.shape
    t = t.transpose(1, 2).reshape(b, s, n * d)
    return t.transpose(0, 1) if layout == "SBH" else t


def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                         scale=1.0, keep_prob=1.0, pre_tockens=2147483647, next_tockens=2147483647, inner_precise=0,
                         prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                         gen_mask_parallel=True, sync=False, softmax_layout="", sink=None, dropout_mask=None, seed=0,
                         offset=0):
    """Softmax(scale * q k^T, masked) v with torch_npu's conventions.

    Layouts BSH / SBH / BSND / BNSD. GQA: key/value may have fewer heads than ``head_num`` (Nq / Nkv integer).
    ``atten_mask``: bool/uint8, True = masked, shape SS, 11SS, B1SS or BNSS. With ``sparse_mode=0`` and a mask, the
    token window applies too (top-left origin): query i may see key j when ``i - pre_tockens <= j <= i +
    next_tockens``. Returns the 7 outputs: (attention_out, softmax_max [B,N,S1,8], softmax_sum [B,N,S1,8],
    softmax_out (empty), seed, offset, numels).
    """
    if sparse_mode != 0:
        raise NotImplementedError("only sparse_mode=0 is emulated")
    if pse is not None or padding_mask is not None or prefix is not None or actual_seq_qlen is not None \
            or actual_seq_kvlen is not None or sink is not None:
        raise NotImplementedError("pse / padding_mask / prefix / varlen / sink are not emulated")
    q = _to_bnsd(query, input_layout, head_num)
    d = q.shape[-1]
    if input_layout in ("SBH", "BSH"):
        kv_heads = key.shape[-1] // d
        k, v = _to_bnsd(key, input_layout, kv_heads), _to_bnsd(value, input_layout, kv_heads)
    else:
        k, v = _to_bnsd(key, input_layout), _to_bnsd(value, input_layout)
    n, nkv = q.shape[1], k.shape[1]
    if n != head_num or n % nkv:
        raise RuntimeError(f"head_num {head_num} must equal query heads ({n}) and be a multiple of kv heads ({nkv})")
    qf, kf, vf = q.float(), k.float(), v.float()
    if nkv != n:
        kf = kf.repeat_interleave(n // nkv, dim=1)
        vf = vf.repeat_interleave(n // nkv, dim=1)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [B, N, S1, S2]
    s1, s2 = scores.shape[-2:]
    if atten_mask is not None:
        masked = atten_mask.bool()
        i = torch.arange(s1, device=scores.device).unsqueeze(1)
        j = torch.arange(s2, device=scores.device).unsqueeze(0)
        masked = masked | (j > i + next_tockens) | (j < i - pre_tockens)
        scores = scores.masked_fill(masked, float("-inf"))
    smax = scores.amax(dim=-1, keepdim=True)
    smax = torch.where(torch.isfinite(smax), smax, torch.zeros_like(smax))
    e = torch.exp(scores - smax)
    ssum = e.sum(dim=-1, keepdim=True)
    probs = e / ssum.clamp_min(torch.finfo(torch.float32).tiny)
    if keep_prob < 1.0:
        probs = F.dropout(probs, p=1.0 - keep_prob, training=True)
    out = torch.matmul(probs, vf).to(query.dtype)
    b = q.shape[0]
    softmax_max = smax.expand(b, n, s1, 8).contiguous()
    softmax_sum = ssum.expand(b, n, s1, 8).contiguous()
    return (_from_bnsd(out, input_layout), softmax_max, softmax_sum, query.new_empty(0), 0, 0, 0)


def npu_apply_adam_w(beta1_power, beta2_power, lr, weight_decay, beta1, beta2, epsilon, grad, max_grad_norm, amsgrad,
                     maximize, *, out):
    """AdamW step in place on ``out = (var, m, v)``; ``beta*_power`` are beta**(step-1) as MindSpeed passes them."""
    if amsgrad or max_grad_norm is not None:
        raise NotImplementedError("amsgrad / max_grad_norm are not emulated")
    var, m, v = out
    g = -grad if maximize else grad
    with torch.no_grad():
        var.mul_(1 - lr * weight_decay)
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bc1 = 1 - beta1_power * beta1
        bc2 = 1 - beta2_power * beta2
        denom = (v.sqrt() / math.sqrt(bc2)).add_(epsilon)
        var.addcdiv_(m, denom, value=-lr / bc1)
    return var, m, v


def _module() -> types.ModuleType:
    mod = types.ModuleType("torch_npu")
    mod.__doc__ = __doc__
    # A spec, so that libraries probing find_spec("torch_npu") (accelerate, transformers) get an answer; they then
    # find no torch.npu device and stay on their CPU paths.
    mod.__spec__ = importlib.machinery.ModuleSpec("torch_npu", loader=None)
    mod.__aquila_emulator__ = True
    mod.calls = collections.Counter()  # op name -> number of calls, so tests can see the fused path ran

    def counted(name):
        fn = globals()[name]

        @functools.wraps(fn)
        def op(*args, **kwargs):
            mod.calls[name] += 1
            return fn(*args, **kwargs)

        return op

    for name in EMULATED_OPS:
        setattr(mod, name, counted(name))
    return mod


@contextlib.contextmanager
def installed():
    """Make ``import torch_npu`` return the emulator inside the block."""
    saved = sys.modules.get("torch_npu")
    sys.modules["torch_npu"] = _module()
    try:
        yield sys.modules["torch_npu"]
    finally:
        if saved is None:
            sys.modules.pop("torch_npu", None)
        else:
            sys.modules["torch_npu"] = saved
