"""The torch_npu ops aquila_npu calls, emulated in plain torch for tests on machines without an Ascend NPU.

It implements only the ops aquila_npu calls, in plain torch, with the real signatures (torch_npu's op schemas),
layouts, mask conventions and return values, and it refuses what the real kernels refuse (each rule cites the line of
torch_npu's op docs it comes from). Results prove API use and numerics, never speed.

    with ops.installed():
        ...  # import torch_npu gives a module of these ops

Only the paths we use are emulated; anything else raises NotImplementedError rather than guessing.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib.machinery
import os
import sys
import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from aquila_npu.device.npu_limits import COMPRESSED_MASK as COMPRESSED

# =====================================================================================================================
# The ops. Signatures are torch_npu's own schemas (``torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml``:
# ``torch_npu.npu_*`` is ``torch.ops.npu.npu_*``, so keyword names are the schema's); tests/test_npu_emulator.py checks
# them against the 2.13.0 and 2.6.0 wheels. Each op refuses what its docs say the kernel refuses (or computes wrongly):
# every ``_check`` names the line of torch_npu 2.13.0's ``torch_npu/_op_plugin_docs.py`` it comes from, in the
# comment above it and in the error. What we never call raises NotImplementedError instead of guessing.
# =====================================================================================================================

EMULATED_OPS = ("npu_rms_norm", "npu_fusion_attention", "npu_rotary_mul", "npu_swiglu",
                "npu_fused_infer_attention_score", "npu_all_gather_base_mm", "npu_mm_reduce_scatter_base")

DOCS = "torch_npu _op_plugin_docs.py"
INT_MAX = 2147483647
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
HALVES = (torch.float16, torch.bfloat16)


class NpuOpError(RuntimeError):
    """A call the real kernel refuses, or one its docs say computes wrong results."""


def _check(ok, op: str, line: int, message: str) -> None:
    if not ok:
        raise NpuOpError(f"{op}: {message} ({DOCS}:{line})")


def _not_emulated(op: str, what: str):
    raise NotImplementedError(f"{op}: {what} is not emulated (aquila_npu never uses it)")


def npu_rms_norm(self: Tensor, gamma: Tensor, epsilon: float = 1e-06):
    """Returns ``(y, rstd)``: y = x * rstd * gamma (computed in fp32, cast to x's dtype); rstd is fp32 and keeps
    the leading dims of x that gamma does not cover (size 1 elsewhere)."""
    op = "npu_rms_norm"
    # 3447「self：Tensor类型，支持float16、bfloat16、float32，输入shape支持2-8维。」
    _check(self.dtype in FLOATS, op, 3447, f"self must be float16, bfloat16 or float32, not {self.dtype}")
    _check(2 <= self.dim() <= 8, op, 3447, f"self must have 2 to 8 dims, not {self.dim()}")
    # 3448「gamma：Tensor类型，数据类型需要和self保持一致，…通常为self的最后一维。」
    _check(gamma.dtype == self.dtype, op, 3448, f"gamma dtype must be self's ({self.dtype}), not {gamma.dtype}")
    _check(gamma.dim() <= self.dim() and gamma.shape == self.shape[self.dim() - gamma.dim():], op, 3448,
           f"gamma {tuple(gamma.shape)} must be the trailing dims of self {tuple(self.shape)}")
    x = self.float()
    dims = tuple(range(self.dim() - gamma.dim(), self.dim()))
    rstd = torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    y = (x * rstd * gamma.float()).to(self.dtype)
    return y, rstd


def npu_swiglu(self: Tensor, dim: int = -1) -> Tensor:
    """silu(first half) * second half along ``dim`` (fp32 math, output in x's dtype)."""
    op = "npu_swiglu"
    # 4404「“x”：Tensor类型，shape支持1-8维，dtype支持FP32、FP16或BF16类型。」
    _check(self.dtype in FLOATS, op, 4404, f"x must be float32, float16 or bfloat16, not {self.dtype}")
    _check(1 <= self.dim() <= 8, op, 4404, f"x must have 1 to 8 dims, not {self.dim()}")
    # 4401「“A”和“B”是x沿dim维度切分的Tensor。」
    _check(self.shape[dim] % 2 == 0, op, 4401, f"x is split in halves A, B along dim {dim}: size {self.shape[dim]} "
                                               "is odd")
    a, b = self.float().chunk(2, dim=dim)
    return (F.silu(a) * b).to(self.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_interleave(x: Tensor) -> Tensor:
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


# The input layouts npu_rotary_mul supports, the axes of B and N in each, and the r1/r2 shapes it accepts for each
# (a letter: that axis of the input; 1: broadcast). half: docs 3552-3554; interleave: docs 3560-3562.
_ROTARY_AXES = {"BNSD": (0, 1), "BSND": (0, 2), "SBND": (1, 2)}
_ROTARY_PATTERNS = {
    "half": {"BNSD": ("11SD", "B1SD", "BNSD"), "BSND": ("1S1D", "BS1D", "BSND"), "SBND": ("S11D", "SB1D", "SBND")},
    "interleave": {"BNSD": ("11SD",), "BSND": ("1S1D",), "SBND": ("S11D",)},
}


def _rotary_layouts(mode: str, x_shape, r_shape):
    """The input layouts for which the r1/r2 shape is one of the listed broadcast patterns."""
    def fits(pattern):
        return all(r == 1 if c == "1" else r == x for c, r, x in zip(pattern, r_shape, x_shape))
    return [layout for layout, patterns in _ROTARY_PATTERNS[mode].items() if any(map(fits, patterns))]


def npu_rotary_mul(self: Tensor, r1: Tensor, r2: Tensor, rotary_mode: str = "half", rotate=None) -> Tensor:
    """x * r1 + rotate(x) * r2 for 4-D x (r1 = cos, r2 = sin broadcast to x); ``rotary_mode`` 'half' (rotate-half,
    as LLaMA/Aquila) or 'interleave'."""
    op = "npu_rotary_mul"
    # 3542「input：必选输入，4维Tensor，数据类型float16, bfloat16, float32」
    _check(self.dim() == 4 and self.dtype in FLOATS, op, 3542,
           f"input must be a 4-D float16/bfloat16/float32 tensor, not {self.dim()}-D {self.dtype}")
    # 3543「cos: 必选输入，4维Tensor，数据类型float16, bfloat16, float32」 (3544: sin, the same)
    _check(all(r.dim() == 4 and r.dtype in FLOATS for r in (r1, r2)), op, 3543,
           "cos (r1) and sin (r2) must be 4-D float16/bfloat16/float32 tensors")
    # 3545「rotary_mode: 可选属性，数据类型string，用于选择计算模式，支持'half'、'interleave'两种模式。」
    _check(rotary_mode in _ROTARY_PATTERNS, op, 3545, f"rotary_mode must be 'half' or 'interleave', not "
                                                      f"{rotary_mode!r}")
    if rotate is not None:
        _not_emulated(op, "rotate=")
    half = rotary_mode == "half"
    line = 3550 if half else 3558
    # 3550「input: layout支持: BNSD、BSND、SBND; D < 896，且为2的倍数; B, N < 1000; 当需要计算cos/sin的反向梯度时，
    # B*N <= 1024」 (3558 interleave: B * N < 1000). Layouts are memory layouts: a strided view (megatron-core's q/k
    # after the QKV split) is none of them, so the input must be contiguous; r1/r2 likewise.
    _check(self.is_contiguous() and r1.is_contiguous() and r2.is_contiguous(), op, line,
           "input, cos and sin must be contiguous (the supported layouts BNSD/BSND/SBND are memory layouts)")
    d = self.shape[-1]
    _check(d < 896 and d % 2 == 0, op, line, f"D must be even and < 896, not {d}")
    # 3555「r2: 同r1」 (3563 for interleave)
    _check(r1.shape == r2.shape, op, 3555 if half else 3563,
           f"sin {tuple(r2.shape)} must have the shape of cos {tuple(r1.shape)}")
    # 3551-3554 (half), 3559-3562 (interleave): r1 per input layout, e.g.「input为SBND: S11D、SB1D、SBND.」
    layouts = _rotary_layouts(rotary_mode, self.shape, r1.shape)
    patterns = "; ".join(f"{k}: {', '.join(v)}" for k, v in _ROTARY_PATTERNS[rotary_mode].items())
    _check(layouts, op, 3551 if half else 3559,
           f"cos/sin {tuple(r1.shape)} broadcast to input {tuple(self.shape)} in none of the {rotary_mode} patterns "
           f"({patterns})")
    bn = [(self.shape[_ROTARY_AXES[k][0]], self.shape[_ROTARY_AXES[k][1]]) for k in layouts]
    if half:
        _check(any(b < 1000 and n < 1000 for b, n in bn), op, 3550, f"B and N must be < 1000 (B, N: {bn[0]})")
        if torch.is_grad_enabled() and (r1.requires_grad or r2.requires_grad):
            _check(any(b * n <= 1024 for b, n in bn), op, 3550, "B*N must be <= 1024 when cos/sin need gradients")
    else:
        _check(any(b * n < 1000 for b, n in bn), op, 3558, f"B*N must be < 1000 (B, N: {bn[0]})")
    rot = _rotate_half if half else _rotate_interleave
    x = self.float()
    return (x * r1.float() + rot(x) * r2.float()).to(self.dtype)


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float, masked: Optional[Tensor], keep_prob: float = 1.0):
    """Attention in fp32 on BNSD tensors; K/V heads repeated for GQA; ``masked`` (True = masked) broadcasts to
    [B, N, S1, S2]; a fully masked row gives zeros. Returns (out, row max, row sum), fp32."""
    n, nkv = q.shape[1], k.shape[1]
    qf, kf, vf = q.float(), k.float(), v.float()
    if nkv != n:
        kf = kf.repeat_interleave(n // nkv, dim=1)
        vf = vf.repeat_interleave(n // nkv, dim=1)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [B, N, S1, S2]
    if masked is not None:
        scores = scores.masked_fill(masked, float("-inf"))
    smax = scores.amax(dim=-1, keepdim=True)
    smax = torch.where(torch.isfinite(smax), smax, torch.zeros_like(smax))
    e = torch.exp(scores - smax)
    ssum = e.sum(dim=-1, keepdim=True)
    probs = e / ssum.clamp_min(torch.finfo(torch.float32).tiny)
    if keep_prob < 1.0:
        probs = F.dropout(probs, p=1.0 - keep_prob, training=True)
    return torch.matmul(probs, vf), smax, ssum


def _positions(s1: int, s2: int, device):
    return torch.arange(s1, device=device).unsqueeze(1), torch.arange(s2, device=device).unsqueeze(0)


def _outside_window(s1: int, s2: int, pre: int, nxt: int, device) -> Tensor:
    """[s1, s2] True where key j is outside query i's token window i - pre <= j <= i + next (top-left origin)."""
    i, j = _positions(s1, s2, device)
    return (j > i + nxt) | (j < i - pre)


def _causal(s1: int, s2: int, mode: int, device) -> Tensor:
    """[s1, s2] True = masked: sparse mode 2 leftUpCausal (j > i), 3 rightDownCausal (j > i + s2 - s1)."""
    i, j = _positions(s1, s2, device)
    return j > i + (s2 - s1 if mode == 3 else 0)


def _is_compressed_causal(mask: Tensor) -> bool:
    """The optimised 2048x2048 mask of sparse modes 2/3: True strictly above the diagonal (lower triangle kept)."""
    m = mask.reshape(COMPRESSED, COMPRESSED).bool()
    return torch.equal(m, torch.ones_like(m).triu(1))


def _bnsd(t: Tensor, layout: str, heads: int) -> Tensor:
    """BNSD view of a BSH / SBH / BSND / BNSD tensor with ``heads`` heads."""
    if layout == "BNSD":
        return t
    if layout == "BSND":
        return t.transpose(1, 2)
    if layout == "SBH":
        t = t.transpose(0, 1)  # [B, S, H]
    b, s, h = t.shape
    return t.reshape(b, s, heads, h // heads).transpose(1, 2)


def _from_bnsd(t: Tensor, layout: str) -> Tensor:
    if layout == "BNSD":
        return t
    if layout == "BSND":
        return t.transpose(1, 2)
    b, n, s, d = t.shape
    t = t.transpose(1, 2).reshape(b, s, n * d)
    return t.transpose(0, 1) if layout == "SBH" else t


def _mask_4d(mask: Tensor) -> Tensor:
    return mask.bool().reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                         scale=1., keep_prob=1., pre_tockens=2147483647, next_tockens=2147483647, inner_precise=0,
                         prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                         gen_mask_parallel=True, sync=False, softmax_layout="", sink=None, dropout_mask=None, seed=0,
                         offset=0):
    """Training FlashAttention: Softmax(scale * q k^T, masked) v with torch_npu's conventions.

    Layouts BSH / SBH / BSND / BNSD; GQA (Nq / Nkv integer). ``atten_mask`` True = masked. sparse_mode 0: the mask
    and the token window i - pre_tockens <= j <= i + next_tockens; 1: the mask; 2: leftUpCausal, 3: rightDownCausal
    (with the 2048x2048 compressed mask). Returns the 7 outputs: (attention_out, softmax_max [B,N,S1,8],
    softmax_sum [B,N,S1,8], softmax_out (empty), seed, offset, numels).
    """
    op = "npu_fusion_attention"
    # 1674「该接口仅在训练场景下使用.」 (torch.inference_mode() is inference by definition)
    _check(not torch.is_inference_mode_enabled(), op, 1674,
           "training only: use npu_fused_infer_attention_score for inference")
    # 1603「query: Tensor类型, 数据类型支持float16、bfloat16、float32」 (1604 key, 1605 value the same)
    _check(all(t.dtype in FLOATS for t in (query, key, value)), op, 1603,
           "query, key and value must be float16, bfloat16 or float32")
    # 1676「输入query、key、value、pse的数据类型必须一致.」
    dtypes = {t.dtype for t in (query, key, value, pse) if t is not None}
    _check(len(dtypes) == 1, op, 1676,
           f"query, key, value and pse must share one dtype, not {sorted(map(str, dtypes))}")
    # 1607「input_layout: string类型, 代表输入query、key、value的数据排布格式, 支持BSH、SBH、BSND、BNSD、TND」
    _check(input_layout in ("BSH", "SBH", "BSND", "BNSD", "TND"), op, 1607,
           f"input_layout must be BSH, SBH, BSND, BNSD or TND, not {input_layout!r}")
    if input_layout == "TND" or actual_seq_qlen is not None or actual_seq_kvlen is not None:
        return _varlen_fusion_attention(query, key, value, head_num, input_layout, pse, padding_mask, atten_mask,
                                        scale, keep_prob, actual_seq_qlen, actual_seq_kvlen, sparse_mode,
                                        softmax_layout, prefix, sink, dropout_mask)
    # 1607 again: the layout is the data arrangement in memory, so a strided view is not in it
    _check(all(t.is_contiguous() for t in (query, key, value)), op, 1607,
           f"query, key and value must be contiguous ({input_layout} is their memory layout)")
    three = input_layout in ("BSH", "SBH")
    # 1679「1. 输入key和value的shape必须一致.」
    _check(key.shape == value.shape, op, 1679, f"key {tuple(key.shape)} and value {tuple(value.shape)} differ")
    # 1606「head_num: int类型, 代表head个数」
    _check(not three or (head_num > 0 and query.shape[-1] % head_num == 0), op, 1606,
           f"head_num {head_num} must divide query's H {query.shape[-1]}")
    q = _bnsd(query, input_layout, head_num)
    d = q.shape[-1]
    # 1681「3. D: Head Dim必须满足Dq=Dk和Dk≥Dv，取值范围1~768.」
    _check((key.shape[-1] % d == 0) if three else key.shape[-1] == d, op, 1681,
           f"key's head dim must equal query's ({d})")
    _check(1 <= d <= 768, op, 1681, f"D must be in 1..768, not {d}")
    k = _bnsd(key, input_layout, key.shape[-1] // d if three else 0)
    v = _bnsd(value, input_layout, key.shape[-1] // d if three else 0)
    (b, n, s1, _), (bk, nkv, s2, _) = q.shape, k.shape
    # 1680「2. B: batchsize必须相等; 非varlen场景B取值范围1~2M」
    _check(b == bk and 1 <= b <= 2 * 1024 * 1024, op, 1680, f"batch sizes {b} (query), {bk} (key) must be equal, <= 2M")
    # 1682「4. S: sequence length, 取值范围1~1M.」
    _check(1 <= s1 <= 1024 * 1024 and 1 <= s2 <= 1024 * 1024, op, 1682, f"S must be in 1..1M, not {s1}, {s2}")
    # 1686「…Nq/Nkv必须是非0整数, Nq取值范围1~256.」
    _check(n == head_num and 1 <= n <= 256 and nkv >= 1 and n % nkv == 0, op, 1686,
           f"head_num {head_num} must be query's N ({n}), 1..256, and a multiple of key/value's N ({nkv})")
    # 1609「padding_mask: Tensor类型, 暂不支持该传参.」
    _check(padding_mask is None, op, 1609, "padding_mask is not supported")
    # 1612「keep_prob: 浮点型, 可选参数, 代表Dropout中1的比例, 取值范围为(0, 1].」
    _check(0.0 < keep_prob <= 1.0, op, 1612, f"keep_prob must be in (0, 1], not {keep_prob}")
    # 1623「sparse_mode: … 支持配置值为0、1、2、3、4、5、6、7、8.」
    _check(sparse_mode in range(9), op, 1623, f"sparse_mode must be 0..8, not {sparse_mode}")
    if sparse_mode > 3:
        _not_emulated(op, f"sparse_mode {sparse_mode}")
    # 1624「softmax_layout: … 当前仅在input\_layout=“TND”时进行配置」
    _check(softmax_layout == "", op, 1624, "softmax_layout is for input_layout TND only")
    if pse is not None or prefix is not None or sink is not None or dropout_mask is not None:
        _not_emulated(op, "pse / prefix / sink / dropout_mask")
    masked = None
    if atten_mask is not None:
        # 1610「atten_mask: … 数据类型支持bool、uint8, 数据格式支持ND, 输入shape类型支持BNSS格式、B1SS格式、11SS格式、SS格式.」
        _check(atten_mask.dtype in (torch.bool, torch.uint8), op, 1610,
               f"atten_mask dtype must be bool or uint8, not {atten_mask.dtype}")
        shape = tuple(atten_mask.shape)
        if sparse_mode in (2, 3):
            s1_, s2_ = COMPRESSED, COMPRESSED
        else:
            s1_, s2_ = s1, s2
        _check(shape in ((s1_, s2_), (1, 1, s1_, s2_), (b, 1, s1_, s2_), (b, n, s1_, s2_)), op, 1610,
               f"atten_mask shape {shape} must be SS, 11SS, B1SS or BNSS with S x S = {s1_} x {s2_}")
    if sparse_mode in (1, 2, 3):
        # 1689「1. sparse_mode为1、2、3、4、5、6、7、8时, 应传入对应正确的atten_mask, 否则将导致计算结果错误.」
        _check(atten_mask is not None, op, 1689, f"sparse_mode {sparse_mode} needs its atten_mask")
    if sparse_mode in (2, 3):
        # 1643「sparse_mode为2时, …传入的atten_mask为优化后的压缩下三角矩阵(2048*2048)」 (1644: mode 3 the same)
        _check(atten_mask.dim() in (2, 4) and atten_mask.numel() == COMPRESSED * COMPRESSED
               and _is_compressed_causal(atten_mask), op, 1643 if sparse_mode == 2 else 1644,
               f"sparse_mode {sparse_mode} takes the compressed 2048x2048 lower-triangular mask (True above the "
               "diagonal)")
        masked = _causal(s1, s2, sparse_mode, q.device)  # pre/next_tockens ignored (1690)
    elif sparse_mode == 1:
        masked = _mask_4d(atten_mask)  # allMask: pre/next_tockens ignored (1642)
    elif atten_mask is not None:
        # 1640「next_tockens为负数时, pre_tockens取值必须大于等于next_tockens的绝对值, 且next_tockens的绝对值小于Skv.」
        _check(next_tockens >= 0 or (pre_tockens >= -next_tockens and -next_tockens < s2), op, 1640,
               f"next_tockens {next_tockens} < 0 needs pre_tockens >= {-next_tockens} and |next_tockens| < Skv")
        # 1641「pre_tockens为负数时, next_tockens取值必须大于等于pre_tockens的绝对值, 且pre_tockens的绝对值小于Sq.」
        _check(pre_tockens >= 0 or (next_tockens >= -pre_tockens and -pre_tockens < s1), op, 1641,
               f"pre_tockens {pre_tockens} < 0 needs next_tockens >= {-pre_tockens} and |pre_tockens| < Sq")
        outside = _outside_window(s1, s2, pre_tockens, next_tockens, q.device)
        mask = _mask_4d(atten_mask)
        # 1691「3. sparse_mode配置为0、4时, 需保证atten_mask与pre_tockens、next_tockens的范围一致.」 (1638: causal is
        # next_tockens 0 with a lower-triangular mask): the kernel skips what lies outside the window, so the mask
        # must mask all of it
        _check(not (outside & ~mask).any(), op, 1691,
               f"atten_mask keeps positions outside the window pre_tockens={pre_tockens}, "
               f"next_tockens={next_tockens} (causal: next_tockens=0 with a lower-triangular mask)")
        masked = mask | outside
    # atten_mask None: no mask, pre/next_tockens ignored (1637)
    out, smax, ssum = _attend(q, k, v, scale, masked, keep_prob)
    softmax_max = smax.expand(b, n, s1, 8).contiguous()
    softmax_sum = ssum.expand(b, n, s1, 8).contiguous()
    return (_from_bnsd(out.to(query.dtype), input_layout), softmax_max, softmax_sum, query.new_empty(0), 0, 0, 0)


def _cumulative_ends(name: str, values, total: int, op: str) -> list:
    """The batches' [start, end) of a cumulative ``actual_seq_*len`` list (1619-1622: the running sums of the true S
    lengths; 1694: a length may be 0; 1695: trailing 0s leave the last batches out), checked."""
    # 1694「actual_seq_qlen的长度取值范围为1~2K」 (1680: varlen B 1~2K)
    _check(values is not None and 1 <= len(values) <= 2048, op, 1694,
           f"{name} needs 1..2048 entries, not {None if values is None else len(values)}")
    values = [int(v) for v in values]
    body = values
    while len(body) > 1 and body[-1] == 0:  # 1695「尾部部分Batch不参与计算…尾部传入对应个数个0」
        body = body[:-1]
    # 1619「表示query每个S的累加和长度」 (1621 key/value): running sums never decrease and end at the T of the tensor
    _check(all(v >= 0 for v in body) and all(b >= a for a, b in zip(body, body[1:])), op, 1619,
           f"{name} {values} must be cumulative (non-decreasing running sums of the S lengths, e.g. 2 4 6)")
    _check(body[-1] == total, op, 1619, f"{name} must end at T = {total} (the running sum of every S), not {body[-1]}")
    starts = [0] + body[:-1]
    return list(zip(starts, body)) + [(total, total)] * (len(values) - len(body))


def _varlen_fusion_attention(query, key, value, head_num, input_layout, pse, padding_mask, atten_mask, scale,
                             keep_prob, actual_seq_qlen, actual_seq_kvlen, sparse_mode, softmax_layout, prefix, sink,
                             dropout_mask):
    """npu_fusion_attention's varlen form: TND tensors ([T, N, D]) holding batches of different S one after the
    other, ``actual_seq_qlen`` / ``actual_seq_kvlen`` their cumulative ends; each batch attends within itself."""
    op = "npu_fusion_attention"
    # 1607「input_layout: … TND(actual_seq_qlen/actual_seq_kvlen需传值)」
    _check(input_layout == "TND" and actual_seq_qlen is not None and actual_seq_kvlen is not None, op, 1607,
           "the varlen form is input_layout TND with both actual_seq_qlen and actual_seq_kvlen")
    _check(all(t.dim() == 3 for t in (query, key, value)), op, 1607,
           f"TND tensors are [T, N, D], not {[tuple(t.shape) for t in (query, key, value)]}")
    _check(all(t.is_contiguous() for t in (query, key, value)), op, 1607,
           "query, key and value must be contiguous (TND is their memory layout)")
    # 1679「1. 输入key和value的shape必须一致.」
    _check(key.shape == value.shape, op, 1679, f"key {tuple(key.shape)} and value {tuple(value.shape)} differ")
    (t1, n, d), (t2, nkv, dk) = query.shape, key.shape
    # 1681「3. D: Head Dim必须满足Dq=Dk和Dk≥Dv，取值范围1~768.」
    _check(dk == d and 1 <= d <= 768, op, 1681, f"key's head dim must equal query's ({d}), in 1..768")
    # 1684「1. 要求T(B*S)取值范围1~1M.」
    _check(1 <= t1 <= 1024 * 1024 and 1 <= t2 <= 1024 * 1024, op, 1684, f"T must be in 1..1M, not {t1}, {t2}")
    # 1686「…Nq/Nkv必须是非0整数, Nq取值范围1~256.」
    _check(n == head_num and 1 <= n <= 256 and n % nkv == 0, op, 1686,
           f"head_num {head_num} must be query's N ({n}), 1..256, and a multiple of key/value's N ({nkv})")
    # 1609「padding_mask: Tensor类型, 暂不支持该传参.」
    _check(padding_mask is None, op, 1609, "padding_mask is not supported")
    # 1612「keep_prob: … 取值范围为(0, 1].」
    _check(0.0 < keep_prob <= 1.0, op, 1612, f"keep_prob must be in (0, 1], not {keep_prob}")
    # 1624「softmax_layout: … 当前仅在input\_layout=“TND”时进行配置，仅支持传入“TND”。」
    _check(softmax_layout in ("", "TND"), op, 1624, f"softmax_layout must be '' or 'TND', not {softmax_layout!r}")
    # 1632「5: prefix非压缩模式. varlen场景不支持.」
    _check(sparse_mode != 5, op, 1632, "sparse_mode 5 (prefix, not compressed) is not supported in the varlen form")
    _check(sparse_mode in range(9), op, 1623, f"sparse_mode must be 0..8, not {sparse_mode}")
    if pse is not None or prefix is not None or sink is not None or dropout_mask is not None:
        _not_emulated(op, "pse / prefix / sink / dropout_mask")
    q_spans = _cumulative_ends("actual_seq_qlen", actual_seq_qlen, t1, op)
    kv_spans = _cumulative_ends("actual_seq_kvlen", actual_seq_kvlen, t2, op)
    # 1680「2. B: batchsize必须相等」: one S length of key/value for each of query
    _check(len(q_spans) == len(kv_spans), op, 1680,
           f"actual_seq_qlen has {len(q_spans)} batches, actual_seq_kvlen {len(kv_spans)}")
    if atten_mask is not None:
        # 1610「…varlen场景只支持SS格式」
        _check(atten_mask.dtype in (torch.bool, torch.uint8) and atten_mask.dim() == 2, op, 1610,
               f"the varlen form takes an SS bool / uint8 atten_mask, not {tuple(atten_mask.shape)} {atten_mask.dtype}")
    if sparse_mode in (2, 3):
        # 1643 / 1644: the compressed 2048x2048 lower-triangular mask
        _check(atten_mask is not None and atten_mask.numel() == COMPRESSED * COMPRESSED
               and _is_compressed_causal(atten_mask), op, 1643 if sparse_mode == 2 else 1644,
               f"sparse_mode {sparse_mode} takes the compressed 2048x2048 lower-triangular mask")
        # 1685「atten_mask输入不支持补pad，即atten_mask中不能存在某一行全1的场景」: rightDownCausal masks whole query
        # rows of a batch whose Sq is larger than its Skv
        _check(sparse_mode == 2 or all(qe - qs <= ke - ks for (qs, qe), (ks, ke) in zip(q_spans, kv_spans)), op,
               1685, "sparse_mode 3 with a batch whose Sq > Skv masks whole rows")
    elif atten_mask is not None:
        _not_emulated(op, f"sparse_mode {sparse_mode} with an atten_mask in the varlen form")
    out = query.new_zeros(t1, n, d)
    smax = torch.zeros(t1, n, 8)
    ssum = torch.zeros(t1, n, 8)
    for (qs, qe), (ks, ke) in zip(q_spans, kv_spans):
        if qe == qs:
            continue
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query[qs:qe], key[ks:ke], value[ks:ke]))  # [1, N, S, D]
        masked = _causal(qe - qs, ke - ks, sparse_mode, query.device) if sparse_mode in (2, 3) else None
        o, mx, sm = _attend(q, k, v, scale, masked, keep_prob)
        out[qs:qe] = o[0].transpose(0, 1).to(query.dtype)
        smax[qs:qe] = mx[0].transpose(0, 1).expand(qe - qs, n, 8)
        ssum[qs:qe] = sm[0].transpose(0, 1).expand(qe - qs, n, 8)
    if softmax_layout != "TND":  # 1624: NTD by default
        smax, ssum = smax.transpose(0, 1).contiguous(), ssum.transpose(0, 1).contiguous()
    return out, smax, ssum, query.new_empty(0), 0, 0, 0


_FIA_UNEMULATED = ("pse_shift", "actual_seq_lengths", "actual_seq_lengths_kv", "dequant_scale1", "quant_scale1",
                   "dequant_scale2", "quant_scale2", "quant_offset2", "antiquant_scale", "antiquant_offset",
                   "key_antiquant_scale", "key_antiquant_offset", "value_antiquant_scale", "value_antiquant_offset",
                   "block_table", "query_padding_size", "kv_padding_size", "key_shared_prefix", "value_shared_prefix",
                   "actual_shared_prefix_len", "query_rope", "key_rope", "key_rope_antiquant_scale")


def npu_fused_infer_attention_score(query, key, value, *, pse_shift=None, atten_mask=None, actual_seq_lengths=None,
                                    actual_seq_lengths_kv=None, dequant_scale1=None, quant_scale1=None,
                                    dequant_scale2=None, quant_scale2=None, quant_offset2=None, antiquant_scale=None,
                                    antiquant_offset=None, key_antiquant_scale=None, key_antiquant_offset=None,
                                    value_antiquant_scale=None, value_antiquant_offset=None, block_table=None,
                                    query_padding_size=None, kv_padding_size=None, key_shared_prefix=None,
                                    value_shared_prefix=None, actual_shared_prefix_len=None, query_rope=None,
                                    key_rope=None, key_rope_antiquant_scale=None, num_heads=1, scale=1.0,
                                    pre_tokens=2147483647, next_tokens=2147483647, input_layout="BSH",
                                    num_key_value_heads=0, sparse_mode=0, inner_precise=0, block_size=0,
                                    antiquant_mode=0, key_antiquant_mode=0, value_antiquant_mode=0,
                                    softmax_lse_flag=False):
    """Inference FlashAttention (prefill when Q_S > 1, incremental decoding when Q_S == 1), fp16/bf16, layouts
    BSH / BSND / BNSD / BNSD_BSND, GQA through ``num_key_value_heads``. sparse_mode 0: the mask and the token window
    (Q_S > 1); 1: the mask; 2 leftUpCausal / 3 rightDownCausal with the 2048x2048 compressed mask (Q_S > 1).
    Returns (attention_out, softmax_lse)."""
    op = "npu_fused_infer_attention_score"
    given = dict(locals())
    unused = [name for name in _FIA_UNEMULATED if given[name] is not None]
    if unused or block_size or antiquant_mode or key_antiquant_mode or value_antiquant_mode:
        _not_emulated(op, ", ".join(unused) or "page attention / antiquant modes")
    # 8151「该接口支持推理场景下使用.」: no backward exists
    _check(not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))), op, 8151,
           "inference only: it has no backward (use npu_fusion_attention to train)")
    # 8065「query: … 数据类型支持float16、bfloat16、int8, 不支持非连续的Tensor」 (int8: quantised, not emulated)
    _check(query.dtype in HALVES, op, 8065, f"query must be float16 or bfloat16, not {query.dtype}")
    # 8067「Atlas A2 训练系列产品/Atlas 800I A2 推理产品: 数据类型支持float16、bfloat16、int8、int4(int32).」 (key; 8070:
    # value), other than query's only with the quantisation inputs
    _check(key.dtype == query.dtype and value.dtype == query.dtype, op, 8067,
           f"key/value dtype ({key.dtype}, {value.dtype}) must be query's ({query.dtype}) without quantisation")
    # 8065 / 8066 / 8069「不支持非连续的Tensor」
    _check(all(t.is_contiguous() for t in (query, key, value)), op, 8065,
           "query, key and value must be contiguous")
    # 8113「…支持BSH、BSND、BNSD、BNSD_BSND、TND」
    _check(input_layout in ("BSH", "BSND", "BNSD", "BNSD_BSND", "TND"), op, 8113,
           f"input_layout must be BSH, BSND, BNSD, BNSD_BSND or TND, not {input_layout!r}")
    if input_layout == "TND":
        _not_emulated(op, "the TND layout")
    # 8155「参数key、value中对应tensor的shape需要完全一致」
    _check(key.shape == value.shape, op, 8155, f"key {tuple(key.shape)} and value {tuple(value.shape)} differ")
    layout = "BNSD" if input_layout == "BNSD_BSND" else input_layout
    n = num_heads
    if layout == "BSH":
        # 8108「num_heads: 整型, 代表query的head个数」
        _check(n > 0 and query.shape[-1] % n == 0, op, 8108, f"num_heads {n} must divide query's H {query.shape[-1]}")
    else:
        # 8108「…在BNSD场景下, 需要与shape中的query的N轴shape值相同」
        qn = query.shape[1] if layout == "BNSD" else query.shape[2]
        _check(n == qn, op, 8108, f"num_heads {n} must be query's N ({qn})")
    nkv = num_key_value_heads or n
    q = _bnsd(query, layout, n)
    b, _, qs, d = q.shape
    kv_n = key.shape[-1] // d if layout == "BSH" else key.shape[1] if layout == "BNSD" else key.shape[2]
    # 8116「num_key_value_heads: … 需要满足num_heads整除num_key_value_heads, num_heads与num_key_value_heads的比值不能
    # 大于64. 在BSND、BNSD、BNSD_BSND(仅支持Q_S大于1)场景下, 还需要与shape中的key/value的N轴shape值相同」
    _check(n % nkv == 0 and n // nkv <= 64 and kv_n == nkv and key.shape[-1] == (nkv * d if layout == "BSH" else d),
           op, 8116, f"num_key_value_heads {num_key_value_heads} must divide num_heads {n} (ratio <= 64) and be "
                     f"key/value's N ({kv_n}) with query's head dim {d}")
    k, v = _bnsd(key, layout, nkv), _bnsd(value, layout, nkv)
    kvs = k.shape[2]
    # 8124「inner_precise: 整型, 一共4种模式: 0、1、2、3. … Q_S为1时该参数仅支持innerPrecise为0和1.」
    _check(inner_precise in ((0, 1) if qs == 1 else (0, 1, 2, 3)), op, 8124, f"inner_precise {inner_precise} invalid")
    # 8117「sparse_mode: … 当前仅支持取值0、1、2、3、4、9」
    _check(sparse_mode in (0, 1, 2, 3, 4, 9), op, 8117, f"sparse_mode must be 0, 1, 2, 3, 4 or 9, not {sparse_mode}")
    if qs > 1:
        # 8115「其中BNSD_BSND含义指当输入为BNSD, 输出格式为BSND, 仅支持Q_S大于1.」 (so nothing to check here)
        # 8203「支持B轴小于等于65536」 8204「支持N轴小于等于256, 支持D轴小于等于512; input_layout为BSH或者BSND时, 要求
        # N*D小于65535.」
        _check(b <= 65536, op, 8203, f"B must be <= 65536, not {b}")
        _check(n <= 256 and d <= 512 and (layout not in ("BSH", "BSND") or n * d < 65535), op, 8204,
               f"N {n} must be <= 256, D {d} <= 512 (and N*D < 65535 for BSH/BSND)")
        # 8210「输入类型全为float16、bfloat16时, D轴需16对齐.」
        _check(d % 16 == 0, op, 8210, f"D must be a multiple of 16 for float16/bfloat16, not {d}")
        # 8212「参数sparse_mode当前仅支持值为0、1、2、3、4的场景, 取其它值时会报错.」
        _check(sparse_mode in range(5), op, 8212, f"sparse_mode must be 0..4 when Q_S > 1, not {sparse_mode}")
    else:
        # 8271「支持B轴小于等于65536, 支持N轴小于等于256, 支持S轴小于等于262144, 支持D轴小于等于512.」
        _check(b <= 65536 and n <= 256 and kvs <= 262144 and d <= 512, op, 8271,
               f"Q_S 1: B {b} <= 65536, N {n} <= 256, KV_S {kvs} <= 262144, D {d} <= 512")
    if sparse_mode in (4, 9) and qs > 1:
        _not_emulated(op, f"sparse_mode {sparse_mode}")
    masked = None
    if atten_mask is not None:
        # 8076「atten_mask: … 数据类型支持bool、int8和uint8. 不支持非连续的Tensor」
        _check(atten_mask.dtype in (torch.bool, torch.int8, torch.uint8), op, 8076,
               f"atten_mask dtype must be bool, int8 or uint8, not {atten_mask.dtype}")
        _check(atten_mask.is_contiguous(), op, 8076, "atten_mask must be contiguous")
    compressed = qs > 1 and sparse_mode in (2, 3, 4)
    if compressed:
        # 8214「sparse_mode=2、3、4时, atten_mask的shape需要为(S, S)或(1, S, S)或(1, 1, S, S), 其中S的值需要固定为2048,
        # 且需要用户保证传入的atten_mask为下三角, 不传入atten_mask或者传入的shape不正确报错.」
        _check(atten_mask is not None and tuple(atten_mask.shape) in ((COMPRESSED,) * 2, (1,) + (COMPRESSED,) * 2,
                                                                     (1, 1) + (COMPRESSED,) * 2)
               and _is_compressed_causal(atten_mask), op, 8214,
               f"sparse_mode {sparse_mode} takes the compressed 2048x2048 lower-triangular mask (True above the "
               "diagonal)")
        masked = _causal(qs, kvs, sparse_mode, q.device)  # pre/next_tokens ignored (8215)
    elif atten_mask is not None:
        shape = tuple(atten_mask.shape)
        # 8078「支持shape传入(1,Q_S,KV_S)、(B,1,Q_S,KV_S)、(1,1,Q_S,KV_S)。」 8079「…Q_S为1可支持传入(B,KV_S)，Q_S大于1时
        # 可支持传入(Q_S,KV_S)。」
        ok = ((1, qs, kvs), (b, 1, qs, kvs), (1, 1, qs, kvs), (b, kvs) if qs == 1 else (qs, kvs))
        _check(shape in ok, op, 8078, f"atten_mask shape {shape} must be one of {ok}")
        mask = atten_mask.bool().reshape(b, 1, 1, kvs) if qs == 1 and shape == (b, kvs) else _mask_4d(atten_mask)
        masked = mask
        if qs > 1 and sparse_mode == 0:
            # 8118「sparse_mode为0时, …如果传入, 则需要传入完整的atten_mask矩阵(S1*S2), 表示pre_tokens和next_tokens之间的
            # 部分需要计算.」
            masked = mask | _outside_window(qs, kvs, pre_tokens, next_tokens, q.device)
    elif qs > 1 and sparse_mode == 1:
        # 8119「sparse_mode为1时, 代表allMask, 必须传入完整的attenmask矩阵(S1*S2).」
        _check(False, op, 8119, "sparse_mode 1 needs the full atten_mask")
    # Q_S == 1: sparse_mode, pre_tokens and next_tokens have no effect (8110, 8111, 8117)
    out, smax, ssum = _attend(q, k, v, scale, masked)
    out = out.to(query.dtype)
    out = out.transpose(1, 2) if input_layout == "BNSD_BSND" else _from_bnsd(out, layout)
    # 8148「softmax_lse_flag为True时, 一般情况下, 输出shape为(B, Q_N, Q_S, 1)的Tensor … 为False时, 则输出shape为[1]的值为0
    # 的Tensor.」
    lse = (smax + torch.log(ssum)) if softmax_lse_flag else torch.zeros(1)
    return out.contiguous(), lse.float()


def _communicator(op: str, line: int, hcom, world_size: int):
    """The process group an MC2 kernel's ``hcom`` names: torch.distributed's name of the group, which the fake
    runtime's ``get_hccl_comm_name`` returns (the table of names is private to torch.distributed)."""
    from torch.distributed import distributed_c10d as c10d

    named = [pg for pg, name in c10d._world.pg_names.items() if name == hcom] \
        if isinstance(hcom, str) and torch.distributed.is_initialized() else []
    # 10190「hcom: String类型, 通信域handle名, 通过get_hccl_comm_name接口获取.」 (10411 the same)
    _check(named, op, line, f"hcom {hcom!r} names no communicator (get it with get_hccl_comm_name)")
    group = named[0]
    # 10191「world_size: int类型, 通信域内的rank总数, 仅支持为2、4、8.」 (10412 the same)
    _check(world_size in (2, 4, 8) and world_size == torch.distributed.get_world_size(group), op, line + 1,
           f"world_size {world_size} must be the communicator's size "
           f"({torch.distributed.get_world_size(group)}) and 2, 4 or 8")
    return group


def _mc2_operands(op: str, lines, self: Tensor, x2: Tensor, bias, comm_turn: int, quantised) -> None:
    dtype_line, x2_line, k_line, bias_line, turn_line, transposed_line = lines
    if any(t is not None for t in quantised):
        _not_emulated(op, "quantisation (x1_scale, x2_scale, output_dtype) and comm_mode")
    # 10188「input: … 数据类型支持float16、bfloat16、int8, …输入shape支持2维」 (int8 is the quantised case) (10409 the same)
    _check(self.dtype in HALVES and self.dim() == 2, op, dtype_line,
           f"input must be a 2-D float16/bfloat16 tensor, not {self.dim()}-D {self.dtype}")
    # 10189「x2: Tensor类型, 数据类型、输入shape维度需要和input保持一致」 (10410 the same)
    _check(x2.dtype == self.dtype and x2.dim() == 2, op, x2_line, "x2 must be 2-D with input's dtype")
    # 10188「…k轴相等, 且k轴取值范围为[256, 65535).」 (10431 the same)
    k = self.shape[1]
    _check(x2.shape[0] == k and 256 <= k < 65535, op, k_line,
           f"input (m, k) {tuple(self.shape)} and x2 (k, n) {tuple(x2.shape)}: k must agree and be in [256, 65535)")
    # 10193「bias: … 当前版本暂不支持bias输入为非0的场景.」 (10415 the same)
    _check(bias is None, op, bias_line, "bias is not supported: add it to the output")
    # 10198「comm_turn: … 当前版本仅支持输入0.」 (10418 the same)
    _check(comm_turn == 0, op, turn_line, f"comm_turn must be 0, not {comm_turn}")
    # 10215「input不支持输入转置后的tensor, x2转置后输入, 需要满足shape的第一维大小与x1的最后一维相同」 (10435 the same)
    _check(self.is_contiguous() and (x2.is_contiguous() or x2.t().is_contiguous()), op, transposed_line,
           "input must be contiguous (not a transposed view); x2 contiguous or transposed")


def npu_all_gather_base_mm(self, x2, hcom, world_size, *, bias=None, x1_scale=None, x2_scale=None, gather_index=0,
                           gather_output=True, comm_turn=0, output_dtype=None, comm_mode=None):
    """MC2 AllGatherMatmul: all-gather ``self`` [m, k] over the communicator (rank order along dim 0), then
    ``gathered @ x2``. Returns (output [m * world_size, n], gathered [m * world_size, k] or empty)."""
    op = "npu_all_gather_base_mm"
    _mc2_operands(op, (10188, 10189, 10188, 10193, 10198, 10215), self, x2, bias, comm_turn,
                  (x1_scale, x2_scale, output_dtype, comm_mode))
    group = _communicator(op, 10190, hcom, world_size)
    # 10196「gather_index: int类型, 表示gather操作对象, 0: 对input做gather, 1: 对x2做gather. 默认值0. 当前版本仅支持输入0.」
    _check(gather_index == 0, op, 10196, f"gather_index must be 0, not {gather_index}")
    gathered = self.new_empty(self.shape[0] * world_size, self.shape[1])
    torch.distributed.all_gather_into_tensor(gathered, self.contiguous(), group=group)
    out = torch.matmul(gathered, x2)
    return out, gathered if gather_output else self.new_empty(0)


def npu_mm_reduce_scatter_base(self, x2, hcom, world_size, *, reduce_op="sum", bias=None, x1_scale=None,
                               x2_scale=None, comm_turn=0, output_dtype=None, comm_mode=None):
    """MC2 MatmulReduceScatter: ``self @ x2`` [m, n] summed over the communicator and scattered along dim 0: this
    rank's [m / world_size, n]."""
    op = "npu_mm_reduce_scatter_base"
    # 10429「该接口仅在训练场景下使用.」
    _check(not torch.is_inference_mode_enabled(), op, 10429, "training only")
    _mc2_operands(op, (10409, 10410, 10431, 10415, 10418, 10435), self, x2, bias, comm_turn,
                  (x1_scale, x2_scale, output_dtype, comm_mode))
    group = _communicator(op, 10411, hcom, world_size)
    # 10414「reduce_op: String类型, reduce操作类型, 当前仅支持'sum', 默认值: 'sum'.」
    _check(reduce_op == "sum", op, 10414, f"reduce_op must be 'sum', not {reduce_op!r}")
    # 10432「m轴需要整除world_size.」
    _check(self.shape[0] % world_size == 0, op, 10432, f"m {self.shape[0]} must be divisible by world_size")
    partial = torch.matmul(self, x2)
    out = partial.new_empty(partial.shape[0] // world_size, partial.shape[1])
    torch.distributed.reduce_scatter_tensor(out, partial, group=group)
    return out


# A deliberately wrong kernel, for the tests of the loss-drift check: ``OP@K/N*F`` multiplies the output of OP's
# calls number K, K + N, K + 2N, ... (0-based) by F, e.g. ``npu_swiglu@2/4*1.05``: with one micro-batch per iteration
# and 4 layers, the third layer's SwiGLU in every forward. Read when the runtime starts; never set outside tests.
PERTURB_ENV = "AQUILA_FAKE_NPU_PERTURB"


def _perturbation(spec):
    if not spec:
        return None
    op, rest = spec.split("@")
    which, factor = rest.split("*")
    k, n = which.split("/")
    if op not in EMULATED_OPS:
        raise ValueError(f"{PERTURB_ENV}={spec}: {op} is not an emulated op")
    return op, int(k), int(n), float(factor)


def module() -> types.ModuleType:
    """A fresh ``torch_npu`` module holding the emulated ops, counting their calls (``calls``)."""
    mod = types.ModuleType("torch_npu")
    mod.__doc__ = __doc__
    # A spec, so that libraries probing find_spec("torch_npu") (accelerate, transformers) get an answer; they then
    # find no torch.npu device and stay on their CPU paths.
    mod.__spec__ = importlib.machinery.ModuleSpec("torch_npu", loader=None)
    mod.__aquila_emulator__ = True
    mod.calls = collections.Counter()  # op name -> number of calls, so tests can see the fused path ran

    perturb = _perturbation(os.environ.get(PERTURB_ENV))

    def counted(name):
        fn = globals()[name]

        @functools.wraps(fn)
        def op(*args, **kwargs):
            mod.calls[name] += 1
            out = fn(*args, **kwargs)
            if perturb is not None and perturb[0] == name and (mod.calls[name] - 1) % perturb[2] == perturb[1]:
                out = out * perturb[3]  # a deliberately wrong kernel (the drift check's test)
            return out

        return op

    for name in EMULATED_OPS:
        setattr(mod, name, counted(name))
    return mod


@contextlib.contextmanager
def installed():
    """Make ``import torch_npu`` return the emulator inside the block."""
    saved = sys.modules.get("torch_npu")
    sys.modules["torch_npu"] = module()
    try:
        yield sys.modules["torch_npu"]
    finally:
        if saved is None:
            sys.modules.pop("torch_npu", None)
        else:
            sys.modules["torch_npu"] = saved
