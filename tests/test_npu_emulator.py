"""The torch_npu emulator: every op against a plain-torch or Hugging Face reference, and its signatures against the
real wheel's meta registrations.

Tolerances: fp32 max abs diff <= 1e-5 (1e-4 for attention); bf16 <= 1.6e-2 (two bf16 ulps at magnitude ~1), with the
reference computed in fp32 from the same bf16 inputs.
"""

import ast
import glob
import inspect
import os
import zipfile

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from aquila_npu.testing import npu_emulator as emu
from helpers import ROOT

TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_hf_and_returns_rstd(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64)
    w = 1 + 0.1 * torch.randn(64)
    ref = LlamaRMSNorm(64, eps=1e-5)
    ref.weight.data.copy_(w)
    y, rstd = emu.npu_rms_norm(x.to(dtype), w.to(dtype), epsilon=1e-5)
    assert y.dtype == dtype and rstd.dtype == torch.float32 and rstd.shape == (3, 5, 1)
    expect = ref(x.to(dtype).float()).to(dtype) if dtype != torch.float32 else ref(x)
    assert (y.float() - expect.float()).abs().max() <= TOL[dtype]
    assert torch.allclose(rstd, torch.rsqrt(x.to(dtype).float().pow(2).mean(-1, keepdim=True) + 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(dtype):
    x = torch.randn(4, 2, 2 * 48).to(dtype)
    a, b = x.float().chunk(2, dim=-1)
    out = emu.npu_swiglu(x, dim=-1)
    assert out.shape == (4, 2, 48) and out.dtype == dtype
    assert (out.float() - F.silu(a) * b).abs().max() <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_mul_matches_hf_rotate_half(dtype):
    s, b, n, d = 7, 2, 4, 16
    q = torch.randn(s, b, n, d)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.outer(torch.arange(s).float(), inv)
    emb = torch.cat((freqs, freqs), dim=-1)  # [s, d]
    cos, sin = emb.cos(), emb.sin()
    out = emu.npu_rotary_mul(q.to(dtype), cos[:, None, None].to(dtype), sin[:, None, None].to(dtype))
    # HF: q [b, n, s, d], cos/sin [b, s, d]
    ref, _ = apply_rotary_pos_emb(q.permute(1, 2, 0, 3), q.permute(1, 2, 0, 3), cos[None].expand(b, -1, -1),
                                  sin[None].expand(b, -1, -1))
    assert out.dtype == dtype
    assert (out.float() - ref.permute(2, 0, 1, 3)).abs().max() <= 2 * TOL[dtype]


def _sdpa_reference(q, k, v, mask):
    """q [b, n, s, d]; k/v [b, nkv, s, d]; mask True = masked."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else ~mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["SBH", "BSH", "BSND", "BNSD"])
def test_fusion_attention_causal_gqa(dtype, layout):
    torch.manual_seed(0)
    b, n, nkv, s, d = 2, 8, 2, 12, 16
    q, k, v = torch.randn(b, n, s, d), torch.randn(b, nkv, s, d), torch.randn(b, nkv, s, d)
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)
    ref = _sdpa_reference(q, k, v, causal)

    def to_layout(t):
        if layout == "BNSD":
            return t
        if layout == "BSND":
            return t.transpose(1, 2)
        bsh = t.transpose(1, 2).reshape(b, s, -1)
        return bsh.transpose(0, 1) if layout == "SBH" else bsh

    out = emu.npu_fusion_attention(to_layout(q.to(dtype)), to_layout(k.to(dtype)), to_layout(v.to(dtype)), n, layout,
                                   atten_mask=causal, scale=d ** -0.5, pre_tockens=65536, next_tockens=0)
    assert len(out) == 7
    assert out[1].shape == (b, n, s, 8) and out[1].dtype == torch.float32
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert (out[0].float() - to_layout(ref)).abs().max() <= tol


def test_fusion_attention_padding_and_decode_masks():
    torch.manual_seed(0)
    b, n, nkv, sq, sk, d = 2, 4, 4, 1, 9, 8
    q, k, v = torch.randn(b, n, sq, d), torch.randn(b, nkv, sk, d), torch.randn(b, nkv, sk, d)
    pad = torch.zeros(b, 1, sq, sk, dtype=torch.bool)
    pad[0, :, :, :3] = True  # left padding of the first sequence
    out = emu.npu_fusion_attention(q, k, v, n, "BNSD", atten_mask=pad, scale=d ** -0.5)[0]
    assert (out - _sdpa_reference(q, k, v, pad)).abs().max() <= 1e-5


def test_fusion_attention_keep_prob_and_unsupported():
    q = torch.randn(1, 2, 4, 8)
    out = emu.npu_fusion_attention(q, q, q, 2, "BNSD", keep_prob=0.5, scale=1.0)[0]
    assert out.shape == q.shape
    with pytest.raises(NotImplementedError):
        emu.npu_fusion_attention(q, q, q, 2, "BNSD", sparse_mode=2)


def test_apply_adam_w_matches_torch_adamw():
    torch.manual_seed(0)
    p_ref = torch.nn.Parameter(torch.randn(10))
    opt = torch.optim.AdamW([p_ref], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    var, m, v = p_ref.detach().clone(), torch.zeros(10), torch.zeros(10)
    for step in range(1, 4):
        g = torch.randn(10)
        p_ref.grad = g.clone()
        opt.step()
        emu.npu_apply_adam_w(0.9 ** (step - 1), 0.95 ** (step - 1), 1e-2, 0.1, 0.9, 0.95, 1e-8, g, None, False, False,
                             out=(var, m, v))
    assert (var - p_ref.detach()).abs().max() <= 1e-6


def test_installed_makes_import_work_and_counts_calls():
    import sys
    assert "torch_npu" not in sys.modules
    with emu.installed() as mod:
        import torch_npu
        assert torch_npu is mod
        torch_npu.npu_swiglu(torch.randn(2, 4))
        assert mod.calls["npu_swiglu"] == 1
    assert "torch_npu" not in sys.modules


# ---------------------------------------------------------------------------------------------------------------
# Signatures against the real torch_npu wheel
# ---------------------------------------------------------------------------------------------------------------


def _wheel():
    path = os.environ.get("AQUILA_TORCH_NPU_WHEEL")
    if path and os.path.exists(path):
        return path
    found = sorted(glob.glob(str(ROOT / ".cache" / "wheels" / "torch_npu-*.whl")))
    return found[-1] if found else None


def _literal(node):
    try:
        return ast.literal_eval(node)
    except ValueError:
        return ast.unparse(node)  # e.g. a dtype default; compared as text


def _meta_signatures(wheel):
    """{op: (positional names, keyword-only names, defaults)} from @impl(m, "op") functions in the wheel."""
    with zipfile.ZipFile(wheel) as z:
        src = z.read("torch_npu/op_plugin/meta/_meta_registrations.py").decode()
    sigs = {}
    for node in ast.walk(ast.parse(src)):
        if not isinstance(node, ast.FunctionDef):
            continue
        for dec in node.decorator_list:
            if isinstance(dec, ast.Call) and len(dec.args) == 2 and isinstance(dec.args[1], ast.Constant):
                op = dec.args[1].value.split(".")[0]
                a = node.args
                names = [x.arg for x in a.args]
                defaults = {n: _literal(d) for n, d in zip(names[len(names) - len(a.defaults):], a.defaults)}
                sigs[op] = (names, [x.arg for x in a.kwonlyargs], defaults)
    return sigs


@pytest.mark.parametrize("op", emu.EMULATED_OPS)
def test_signature_matches_real_wheel(op):
    wheel = _wheel()
    if wheel is None:
        pytest.skip("torch_npu wheel not available locally (set AQUILA_TORCH_NPU_WHEEL or run .ci/run, which "
                    "downloads it to .cache/wheels without installing it)")
    names, kwonly, defaults = _meta_signatures(wheel)[op]
    sig = inspect.signature(getattr(emu, op))
    ours = [p.name for p in sig.parameters.values() if p.kind == p.POSITIONAL_OR_KEYWORD]
    ours_kw = [p.name for p in sig.parameters.values() if p.kind == p.KEYWORD_ONLY]
    assert ours == names and ours_kw == kwonly
    for name, default in defaults.items():
        assert sig.parameters[name].default == default, (op, name)
