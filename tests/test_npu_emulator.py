"""The torch_npu emulator and the modules that call it.

- every op against a plain-torch or Hugging Face reference;
- every documented constraint the emulator enforces raises, and the doc line it cites is checked against the real
  wheel's ``torch_npu/_op_plugin_docs.py`` (the line lies in that op's docs; quoted doc text in the emulator's comments
  is on that line);
- signatures against the real wheels' op schemas (``npu_native_functions_by_codegen.yaml``), torch_npu 2.13.0 and, for
  the ops it has, 2.6.0; every kernel argument ``device/npu_modules.py`` passes exists in 2.6.0;
- NpuFlashAttention in training (sparse modes 0 and 2) and inference (npu_fused_infer_attention_score, and the plain
  fallback outside its limits); the MC2 linears' checks; the MC2 kernels and linears on two processes.

The wheels are read, never installed: the test session downloads them once to ``.cache/wheels`` (or point
AQUILA_TORCH_NPU_WHEEL at one wheel, AQUILA_TORCH_NPU_WHEEL_DIR at a folder of them). Tests that need a wheel skip
only where none is there and none can be downloaded.

Tolerances: fp32 max abs diff <= 1e-5 (1e-4 for attention); bf16 <= 1.6e-2 (two bf16 ulps at magnitude ~1), with the
reference computed in fp32 from the same bf16 inputs.
"""

import ast
import inspect
import json
import re
import warnings
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from aquila_npu.device.torch_modules import shared_causal_mask
from aquila_npu.testing.npu import ops as emu
from helpers import ROOT, fake_npu_env, torch_npu_wheel, torchrun

TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.bfloat16]
EMULATOR_SRC = ROOT / "aquila_npu" / "testing" / "npu" / "ops.py"
MODULES_SRC = ROOT / "aquila_npu" / "device" / "npu_modules.py"


# ------------------------------------------------------------------------------------------------- the real wheels
def _read(version, member):
    wheel = torch_npu_wheel(version)
    if wheel is None:
        pytest.skip(f"torch_npu {version} wheel neither in .cache/wheels nor downloadable (no package index; or set "
                    "AQUILA_TORCH_NPU_WHEEL[_DIR])")
    with zipfile.ZipFile(wheel) as z:
        return z.read(member).decode()


def _docs_lines():
    return _read("2.13.0", "torch_npu/_op_plugin_docs.py").splitlines()


def _doc_blocks(lines):
    """{op: (first line, last line)} (1-based) of each op's ``_add_torch_npu_docstr("op", ...)`` block."""
    starts = [(i + 2, lines[i + 1].strip().strip('",')) for i, line in enumerate(lines[:-1])
              if line.startswith("_add_torch_npu_docstr(")]
    return {op: (start, (starts[k + 1][0] - 2) if k + 1 < len(starts) else len(lines))
            for k, (start, op) in enumerate(starts)}


def _literal(text):
    text = text.strip()
    if text in ("None", "True", "False"):
        return {"None": None, "True": True, "False": False}[text]
    if text[:1] in "'\"":
        return text[1:-1]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text  # e.g. an enum default, compared as text


_NO_DEFAULT = object()


def _schemas(version):
    """{op or op.overload: (positional [(name, default)], keyword-only [(name, default)])} from the wheel's
    ``npu_native_functions_by_codegen.yaml``; an op listed twice (two implementations) must say the same."""
    text = _read(version, "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml")
    out = {}
    for m in re.finditer(r"func: ([\w.]+)\((.*)\) ->", text):
        if m.group(1).split(".")[0] not in emu.EMULATED_OPS:
            continue
        positional, keyword = [], []
        target = positional
        for arg in m.group(2).split(", "):
            if arg == "*":
                target = keyword
                continue
            name = arg.rsplit(" ", 1)[1]
            name, _, default = name.partition("=")
            target.append((name, _literal(default) if default else _NO_DEFAULT))
        sig = (positional, keyword)
        assert out.setdefault(m.group(1), sig) == sig, m.group(1)
    return out


def _ours(op):
    sig = inspect.signature(getattr(emu, op))
    pick = lambda kind: [(p.name, _NO_DEFAULT if p.default is p.empty else p.default)
                         for p in sig.parameters.values() if p.kind == kind]
    return pick(inspect.Parameter.POSITIONAL_OR_KEYWORD), pick(inspect.Parameter.KEYWORD_ONLY)


@pytest.mark.parametrize("op", emu.EMULATED_OPS)
def test_signature_matches_torch_npu_2_13_0_schema(op):
    """``torch_npu.npu_x`` is ``torch.ops.npu.npu_x``: the schema's names, order, keyword-only split and defaults."""
    schemas = _schemas("2.13.0")
    positional, keyword = _ours(op)
    if ("out", _NO_DEFAULT) in keyword:  # the documented out=(...) form of an in-place op: its .out overload
        keyword.remove(("out", _NO_DEFAULT))
        assert [n for n, _ in schemas[f"{op}.out"][1]] == ["var", "m", "v"]
    assert (positional, keyword) == schemas[op]


@pytest.mark.parametrize("op", emu.EMULATED_OPS)
def test_signature_is_a_superset_of_torch_npu_2_6_0_schema(op):
    """torch_npu 2.6.0 (the oldest supported): its arguments come first, same names, kinds and defaults; ours only
    adds newer ones after them."""
    schemas = _schemas("2.6.0")
    if op not in schemas:
        pytest.skip(f"{op} does not exist in torch_npu 2.6.0")
    positional, keyword = _ours(op)
    old_pos, old_kw = schemas[op]
    assert positional[:len(old_pos)] == old_pos
    assert all(item in keyword for item in old_kw)


def _kernel_calls():
    """{op: (positional argument count, keyword names)} of every ``torch_npu().npu_x(...)`` call in npu_modules.py;
    the keys of ``dict(...)`` literals in the same function count as that call's keywords (``**sparse``)."""
    tree = ast.parse(MODULES_SRC.read_text())
    calls = {}
    for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
        dict_keys = {k.arg for n in ast.walk(fn) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "dict"
                     for k in n.keywords}
        for n in ast.walk(fn):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr.startswith("npu_") \
                    and isinstance(n.func.value, ast.Call) and getattr(n.func.value.func, "id", "") == "torch_npu":
                names = {k.arg for k in n.keywords if k.arg} | (dict_keys if any(k.arg is None for k in n.keywords)
                                                               else set())
                count, seen = calls.get(n.func.attr, (0, set()))
                calls[n.func.attr] = (max(count, len(n.args)), seen | names)
    return calls


def test_every_kernel_argument_we_pass_exists_in_torch_npu_2_6_0():
    schemas = _schemas("2.6.0")
    calls = _kernel_calls()
    assert set(calls) == {"npu_rms_norm", "npu_swiglu", "npu_rotary_mul", "npu_fusion_attention",
                          "npu_fused_infer_attention_score", "npu_all_gather_base_mm", "npu_mm_reduce_scatter_base"}
    for op, (count, names) in calls.items():
        positional, keyword = schemas[op]
        assert count <= len(positional), op
        assert names <= {n for n, _ in positional + keyword}, (op, names - {n for n, _ in positional + keyword})


# ----------------------------------------------------------------------------------------------------- numerics
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


def _sdpa_reference(q, k, v, mask, scale=None):
    """q [b, n, s, d]; k/v [b, nkv, s, d]; mask True = masked (broadcast to [b, n, sq, sk])."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q.float(), k, v, attn_mask=None if mask is None else ~mask, scale=scale)


def _to_layout(t, layout):
    """A BNSD tensor in ``layout``, contiguous (the kernels' layouts are memory layouts)."""
    b, n, s, d = t.shape
    if layout in ("BNSD", "BNSD_BSND"):
        return t.contiguous()
    if layout == "BSND":
        return t.transpose(1, 2).contiguous()
    bsh = t.transpose(1, 2).reshape(b, s, n * d)
    return (bsh.transpose(0, 1) if layout == "SBH" else bsh).contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["SBH", "BSH", "BSND", "BNSD"])
def test_fusion_attention_causal_gqa(dtype, layout):
    torch.manual_seed(0)
    b, n, nkv, s, d = 2, 8, 2, 12, 16
    q, k, v = torch.randn(b, n, s, d), torch.randn(b, nkv, s, d), torch.randn(b, nkv, s, d)
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)
    ref = _sdpa_reference(q, k, v, causal)
    out = emu.npu_fusion_attention(*(_to_layout(t.to(dtype), layout) for t in (q, k, v)), n, layout,
                                   atten_mask=causal, scale=d ** -0.5, pre_tockens=65536, next_tockens=0)
    assert len(out) == 7
    assert out[1].shape == (b, n, s, 8) and out[1].dtype == torch.float32
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert (out[0].float() - _to_layout(ref, layout)).abs().max() <= tol


@pytest.mark.parametrize("sq,sk", [(12, 12), (5, 12)])
def test_fusion_attention_sparse_modes_2_and_3_with_the_compressed_mask(sq, sk):
    """leftUpCausal (2): query i sees keys 0..i; rightDownCausal (3): queries aligned to the end of the keys."""
    torch.manual_seed(0)
    b, n, d = 2, 4, 16
    q, k, v = torch.randn(b, n, sq, d), torch.randn(b, n, sk, d), torch.randn(b, n, sk, d)
    compressed = torch.ones(2048, 2048, dtype=torch.bool).triu(1)
    i, j = torch.arange(sq)[:, None], torch.arange(sk)[None]
    for mode, masked in ((2, j > i), (3, j > i + sk - sq)):
        out = emu.npu_fusion_attention(q, k, v, n, "BNSD", atten_mask=compressed, scale=d ** -0.5, sparse_mode=mode,
                                       pre_tockens=1, next_tockens=1)[0]  # the window is ignored in these modes
        assert (out - _sdpa_reference(q, k, v, masked, d ** -0.5)).abs().max() <= 1e-5


def test_fusion_attention_padding_and_decode_masks():
    torch.manual_seed(0)
    b, n, nkv, sq, sk, d = 2, 4, 4, 1, 9, 8
    q, k, v = torch.randn(b, n, sq, d), torch.randn(b, nkv, sk, d), torch.randn(b, nkv, sk, d)
    pad = torch.zeros(b, 1, sq, sk, dtype=torch.bool)
    pad[0, :, :, :3] = True  # left padding of the first sequence
    out = emu.npu_fusion_attention(q, k, v, n, "BNSD", atten_mask=pad, scale=d ** -0.5)[0]
    assert (out - _sdpa_reference(q, k, v, pad)).abs().max() <= 1e-5


def test_fusion_attention_keep_prob_and_unemulated_modes():
    q = torch.randn(1, 2, 4, 8)
    out = emu.npu_fusion_attention(q, q, q, 2, "BNSD", keep_prob=0.5, scale=1.0)[0]
    assert out.shape == q.shape
    with pytest.raises(NotImplementedError):
        emu.npu_fusion_attention(q, q, q, 2, "BNSD", sparse_mode=4)


@pytest.mark.parametrize("layout", ["BSH", "BSND", "BNSD", "BNSD_BSND"])
def test_fused_infer_attention_prefill_and_decode_match_sdpa(layout):
    """Prefill (Q_S > 1, rightDownCausal with the compressed mask) and one decoding step (Q_S == 1, no mask), GQA."""
    torch.manual_seed(0)
    b, n, nkv, s, d = 2, 8, 2, 9, 16
    q, k, v = (torch.randn(b, h, s, d).bfloat16() for h in (n, nkv, nkv))
    compressed = torch.ones(2048, 2048, dtype=torch.bool).triu(1)
    kw = dict(num_heads=n, num_key_value_heads=nkv, scale=d ** -0.5, input_layout=layout)
    out, lse = emu.npu_fused_infer_attention_score(*(_to_layout(t, layout) for t in (q, k, v)), atten_mask=compressed,
                                                   sparse_mode=3, softmax_lse_flag=True, **kw)
    ref = _sdpa_reference(q, k, v, torch.ones(s, s, dtype=torch.bool).triu(1), d ** -0.5)
    expect = ref.transpose(1, 2) if layout == "BNSD_BSND" else _to_layout(ref, layout)
    assert out.dtype == torch.bfloat16 and out.shape == expect.shape
    assert (out.float() - expect).abs().max() <= 3e-2
    assert lse.shape == (b, n, s, 1) and lse.dtype == torch.float32
    if layout != "BNSD_BSND":  # BNSD_BSND needs Q_S > 1 (docs 8115)
        step, _ = emu.npu_fused_infer_attention_score(_to_layout(q[:, :, -1:], layout), _to_layout(k, layout),
                                                      _to_layout(v, layout), **kw)
        assert (step.float() - _to_layout(_sdpa_reference(q[:, :, -1:], k, v, None, d ** -0.5), layout)).abs().max() \
            <= 3e-2


def test_installed_makes_import_work_and_counts_calls():
    import sys
    assert "torch_npu" not in sys.modules
    with emu.installed() as mod:
        import torch_npu
        assert torch_npu is mod
        torch_npu.npu_swiglu(torch.randn(2, 4))
        assert mod.calls["npu_swiglu"] == 1
    assert "torch_npu" not in sys.modules


def test_varlen_layout_attends_within_each_document_as_the_plain_path():
    """TND with cumulative lengths equals each document through the BNSD path (causal, GQA), zero-length documents
    and trailing zeros included (docs 1694, 1695)."""
    torch.manual_seed(0)
    lengths = [3, 0, 1, 4]
    t = sum(lengths)
    q, k, v = torch.randn(t, 4, 16), torch.randn(t, 2, 16), torch.randn(t, 2, 16)
    cumulative = list(np.cumsum(lengths)) + [0]
    out = emu.npu_fusion_attention(q, k, v, 4, "TND", atten_mask=_compressed(), scale=0.25,
                                   actual_seq_qlen=cumulative, actual_seq_kvlen=cumulative, sparse_mode=3)[0]
    at = 0
    for n in lengths:
        if n:
            ref = emu.npu_fusion_attention(*(x[at:at + n].transpose(0, 1)[None].contiguous() for x in (q, k, v)), 4,
                                           "BNSD", atten_mask=_compressed(), scale=0.25, sparse_mode=3)[0]
            torch.testing.assert_close(out[at:at + n], ref[0].transpose(0, 1))
        at += n


# ------------------------------------------------------------------------------------- the rules: each one refused
def _fa(**kw):
    """A valid npu_fusion_attention call (BNSD, GQA 4/2, causal) with ``kw`` replacing its arguments."""
    torch.manual_seed(0)
    args = dict(query=torch.randn(2, 4, 8, 16), key=torch.randn(2, 2, 8, 16), value=torch.randn(2, 2, 8, 16),
                head_num=4, input_layout="BNSD", atten_mask=torch.ones(8, 8, dtype=torch.bool).triu(1),
                scale=0.25, pre_tockens=8, next_tockens=0)
    args.update(kw)
    return lambda: emu.npu_fusion_attention(**args)


def _tnd(**kw):
    """A valid varlen npu_fusion_attention call (TND, GQA 4/2, documents of 3, 1 and 4 tokens, causal within each)."""
    torch.manual_seed(0)
    args = dict(query=torch.randn(8, 4, 16), key=torch.randn(8, 2, 16), value=torch.randn(8, 2, 16), head_num=4,
                input_layout="TND", atten_mask=_compressed(), scale=0.25, actual_seq_qlen=[3, 4, 8],
                actual_seq_kvlen=[3, 4, 8], sparse_mode=3)
    args.update(kw)
    return lambda: emu.npu_fusion_attention(**args)


def _fia(qs=5, **kw):
    """A valid npu_fused_infer_attention_score call (BSND bf16, GQA 4/2, Q_S ``qs``, KV_S 7)."""
    torch.manual_seed(0)
    args = dict(query=torch.randn(2, qs, 4, 16).bfloat16(), key=torch.randn(2, 7, 2, 16).bfloat16(),
                value=torch.randn(2, 7, 2, 16).bfloat16(), num_heads=4, num_key_value_heads=2, input_layout="BSND")
    args.update(kw)
    q, k, v = args.pop("query"), args.pop("key"), args.pop("value")
    return lambda: emu.npu_fused_infer_attention_score(q, k, v, **args)


def _rot(x=(3, 2, 4, 8), r=(3, 1, 1, 8), mode="half", **kw):
    args = dict(self=torch.randn(*x), r1=torch.rand(*r), r2=torch.rand(*r), rotary_mode=mode)
    args.update(kw)
    return lambda: emu.npu_rotary_mul(**args)


def _ag(**kw):
    args = dict(self=torch.randn(4, 256).bfloat16(), x2=torch.randn(256, 8).bfloat16(), hcom="no-such-group",
                world_size=2)
    args.update(kw)
    return lambda: emu.npu_all_gather_base_mm(**args)


def _rs(**kw):
    args = dict(self=torch.randn(4, 256).bfloat16(), x2=torch.randn(256, 8).bfloat16(), hcom="no-such-group",
                world_size=2)
    args.update(kw)
    return lambda: emu.npu_mm_reduce_scatter_base(**args)


def _in_inference_mode(fn):
    def run():
        with torch.inference_mode():
            fn()
    return run


def _with_grad(fn):
    def run():
        with torch.enable_grad():
            fn()
    return run


def _compressed(**kw):
    return torch.ones(2048, 2048, dtype=torch.bool, **kw).triu(1)


_Q = torch.randn(2, 4, 8, 16)
RULES = [  # (op, doc line, a call that breaks the rule)
    ("npu_rms_norm", 3447, lambda: emu.npu_rms_norm(torch.randn(4, 8).double(), torch.ones(8).double())),
    ("npu_rms_norm", 3447, lambda: emu.npu_rms_norm(torch.randn(8), torch.ones(8))),
    ("npu_rms_norm", 3448, lambda: emu.npu_rms_norm(torch.randn(4, 8).bfloat16(), torch.ones(8))),  # gamma fp32
    ("npu_rms_norm", 3448, lambda: emu.npu_rms_norm(torch.randn(4, 8), torch.ones(4))),
    ("npu_swiglu", 4404, lambda: emu.npu_swiglu(torch.randn(4, 8).double())),
    ("npu_swiglu", 4404, lambda: emu.npu_swiglu(torch.randn([1] * 8 + [2]))),
    ("npu_swiglu", 4401, lambda: emu.npu_swiglu(torch.randn(4, 7))),
    ("npu_rotary_mul", 3542, _rot(x=(3, 2, 8), r=(3, 1, 8))),
    ("npu_rotary_mul", 3542, lambda: emu.npu_rotary_mul(torch.randn(3, 2, 4, 8).double(), torch.rand(3, 1, 1, 8),
                                                        torch.rand(3, 1, 1, 8))),
    ("npu_rotary_mul", 3543, lambda: emu.npu_rotary_mul(torch.randn(3, 2, 4, 8), torch.rand(3, 8), torch.rand(3, 8))),
    ("npu_rotary_mul", 3545, _rot(mode="quarter")),
    ("npu_rotary_mul", 3550, _rot(self=torch.randn(3, 4, 2, 8).transpose(1, 2))),  # a strided view
    ("npu_rotary_mul", 3550, _rot(x=(3, 2, 4, 7), r=(3, 1, 1, 7))),  # D odd
    ("npu_rotary_mul", 3550, _rot(x=(1, 1, 1, 896), r=(1, 1, 1, 896))),  # D >= 896
    ("npu_rotary_mul", 3550, _rot(x=(2, 1000, 1, 2), r=(2, 1, 1, 2))),  # B >= 1000
    ("npu_rotary_mul", 3550, _with_grad(_rot(x=(2, 40, 30, 2), r=(2, 1, 1, 2),
                                             r1=torch.rand(2, 1, 1, 2, requires_grad=True)))),  # B*N > 1024
    ("npu_rotary_mul", 3555, _rot(r2=torch.rand(1, 1, 3, 8))),
    ("npu_rotary_mul", 3551, _rot(r=(1, 2, 4, 8))),  # no layout's pattern
    ("npu_rotary_mul", 3558, _rot(x=(2, 40, 25, 4), r=(2, 1, 1, 4), mode="interleave")),  # B*N >= 1000
    ("npu_rotary_mul", 3559, _rot(r=(3, 2, 1, 8), mode="interleave")),  # SB1D: half mode only
    ("npu_rotary_mul", 3563, _rot(mode="interleave", r2=torch.rand(1, 1, 3, 8))),
    ("npu_fusion_attention", 1674, _in_inference_mode(_fa())),
    ("npu_fusion_attention", 1603, _fa(query=_Q.double(), key=_Q.double(), value=_Q.double(), head_num=4,
                                       atten_mask=None)),
    ("npu_fusion_attention", 1676, _fa(query=_Q.bfloat16())),
    ("npu_fusion_attention", 1607, _fa(input_layout="BHSD")),
    ("npu_fusion_attention", 1607, _fa(query=torch.randn(2, 8, 4, 16).transpose(1, 2))),
    ("npu_fusion_attention", 1679, _fa(value=torch.randn(2, 2, 8, 32))),
    ("npu_fusion_attention", 1606, _fa(query=torch.randn(2, 8, 62), key=torch.randn(2, 8, 32),
                                       value=torch.randn(2, 8, 32), input_layout="BSH", atten_mask=None)),
    ("npu_fusion_attention", 1681, _fa(key=torch.randn(2, 2, 8, 32), value=torch.randn(2, 2, 8, 32))),
    ("npu_fusion_attention", 1681, _fa(query=torch.randn(1, 1, 1, 769), key=torch.randn(1, 1, 1, 769),
                                       value=torch.randn(1, 1, 1, 769), head_num=1, atten_mask=None)),
    ("npu_fusion_attention", 1680, _fa(key=torch.randn(1, 2, 8, 16), value=torch.randn(1, 2, 8, 16))),
    ("npu_fusion_attention", 1682, _fa(query=torch.randn(1, 1, 1024 * 1024 + 1, 1), key=torch.randn(1, 1, 4, 1),
                                       value=torch.randn(1, 1, 4, 1), head_num=1, atten_mask=None)),
    ("npu_fusion_attention", 1686, _fa(head_num=2)),
    ("npu_fusion_attention", 1686, _fa(key=torch.randn(2, 3, 8, 16), value=torch.randn(2, 3, 8, 16))),
    ("npu_fusion_attention", 1686, _fa(query=torch.randn(1, 257, 1, 16), key=torch.randn(1, 1, 1, 16),
                                       value=torch.randn(1, 1, 1, 16), head_num=257, atten_mask=None)),
    ("npu_fusion_attention", 1609, _fa(padding_mask=torch.zeros(8, 8, dtype=torch.bool))),
    ("npu_fusion_attention", 1612, _fa(keep_prob=0.0)),
    ("npu_fusion_attention", 1623, _fa(sparse_mode=9)),
    ("npu_fusion_attention", 1624, _fa(softmax_layout="TND")),
    ("npu_fusion_attention", 1610, _fa(atten_mask=torch.zeros(8, 8))),  # float mask
    ("npu_fusion_attention", 1610, _fa(atten_mask=torch.zeros(2, 2, 8, 8, dtype=torch.bool))),  # N 2 != 4
    ("npu_fusion_attention", 1610, _fa(atten_mask=torch.zeros(8, 8, dtype=torch.bool), sparse_mode=2)),  # not 2048
    ("npu_fusion_attention", 1689, _fa(atten_mask=None, sparse_mode=2)),
    ("npu_fusion_attention", 1643, _fa(atten_mask=torch.zeros(2048, 2048, dtype=torch.bool), sparse_mode=2)),
    ("npu_fusion_attention", 1644, _fa(atten_mask=_compressed().T.contiguous(), sparse_mode=3)),
    ("npu_fusion_attention", 1640, _fa(pre_tockens=1, next_tockens=-3)),
    ("npu_fusion_attention", 1641, _fa(pre_tockens=-3, next_tockens=1)),
    ("npu_fusion_attention", 1691, _fa(atten_mask=torch.zeros(8, 8, dtype=torch.bool))),  # causal window, no mask
    # the varlen (TND) form
    ("npu_fusion_attention", 1607, _tnd(actual_seq_kvlen=None)),
    ("npu_fusion_attention", 1607, _fa(actual_seq_qlen=[8], actual_seq_kvlen=[8])),  # BNSD with lengths
    ("npu_fusion_attention", 1607, _tnd(query=torch.randn(1, 8, 4, 16))),  # not [T, N, D]
    ("npu_fusion_attention", 1619, _tnd(actual_seq_qlen=[3, 1, 8], actual_seq_kvlen=[3, 1, 8])),  # not cumulative
    ("npu_fusion_attention", 1619, _tnd(actual_seq_qlen=[3, 4, 7], actual_seq_kvlen=[3, 4, 7])),  # ends before T
    ("npu_fusion_attention", 1694, _tnd(actual_seq_qlen=[], actual_seq_kvlen=[])),
    ("npu_fusion_attention", 1694, _tnd(actual_seq_qlen=list(range(1, 2050)), actual_seq_kvlen=list(range(1, 2050)),
                                        query=torch.randn(2049, 4, 16), key=torch.randn(2049, 2, 16),
                                        value=torch.randn(2049, 2, 16))),
    ("npu_fusion_attention", 1680, _tnd(actual_seq_kvlen=[4, 8])),  # 3 query batches, 2 key/value ones
    ("npu_fusion_attention", 1684, _tnd(query=torch.randn(1024 * 1024 + 1, 1, 1), key=torch.randn(8, 1, 1),
                                        value=torch.randn(8, 1, 1), head_num=1, actual_seq_qlen=[1024 * 1024 + 1])),
    ("npu_fusion_attention", 1632, _tnd(sparse_mode=5)),
    ("npu_fusion_attention", 1610, _tnd(atten_mask=_compressed().reshape(1, 1, 2048, 2048))),  # SS only
    ("npu_fusion_attention", 1644, _tnd(atten_mask=_compressed().T.contiguous())),
    ("npu_fusion_attention", 1685, _tnd(actual_seq_qlen=[4, 4, 8], actual_seq_kvlen=[3, 4, 8])),  # Sq 4 > Skv 3
    ("npu_fusion_attention", 1624, _tnd(softmax_layout="NTD")),
    ("npu_fused_infer_attention_score", 8151,
     _with_grad(_fia(query=torch.randn(2, 5, 4, 16).bfloat16().requires_grad_()))),
    ("npu_fused_infer_attention_score", 8065, _fia(query=torch.randn(2, 5, 4, 16), key=torch.randn(2, 7, 2, 16),
                                                   value=torch.randn(2, 7, 2, 16))),  # fp32
    ("npu_fused_infer_attention_score", 8065, _fia(query=torch.randn(2, 4, 5, 16).bfloat16().transpose(1, 2))),
    ("npu_fused_infer_attention_score", 8067, _fia(key=torch.randn(2, 7, 2, 16).half(),
                                                   value=torch.randn(2, 7, 2, 16).half())),
    ("npu_fused_infer_attention_score", 8113, _fia(input_layout="SBH")),
    ("npu_fused_infer_attention_score", 8155, _fia(value=torch.randn(2, 6, 2, 16).bfloat16())),
    ("npu_fused_infer_attention_score", 8108, _fia(query=torch.randn(2, 4, 5, 16).bfloat16(),
                                                   key=torch.randn(2, 2, 7, 16).bfloat16(),
                                                   value=torch.randn(2, 2, 7, 16).bfloat16(), input_layout="BNSD",
                                                   num_heads=2, num_key_value_heads=1)),
    ("npu_fused_infer_attention_score", 8116, _fia(num_key_value_heads=3)),
    ("npu_fused_infer_attention_score", 8116, _fia(num_key_value_heads=0)),  # 4 != key's N (2)
    ("npu_fused_infer_attention_score", 8124, _fia(qs=1, inner_precise=2)),
    ("npu_fused_infer_attention_score", 8117, _fia(sparse_mode=7)),
    ("npu_fused_infer_attention_score", 8203, _fia(query=torch.randn(65537, 2, 1, 16).bfloat16(),
                                                   key=torch.randn(65537, 2, 1, 16).bfloat16(),
                                                   value=torch.randn(65537, 2, 1, 16).bfloat16(), num_heads=1,
                                                   num_key_value_heads=1)),
    ("npu_fused_infer_attention_score", 8204, _fia(query=torch.randn(1, 2, 257, 16).bfloat16(),
                                                   key=torch.randn(1, 2, 257, 16).bfloat16(),
                                                   value=torch.randn(1, 2, 257, 16).bfloat16(), num_heads=257,
                                                   num_key_value_heads=257)),
    ("npu_fused_infer_attention_score", 8210, _fia(query=torch.randn(2, 5, 4, 8).bfloat16(),
                                                   key=torch.randn(2, 7, 2, 8).bfloat16(),
                                                   value=torch.randn(2, 7, 2, 8).bfloat16())),
    ("npu_fused_infer_attention_score", 8212, _fia(sparse_mode=9)),
    ("npu_fused_infer_attention_score", 8271, _fia(qs=1, query=torch.randn(1, 1, 1, 528).bfloat16(),
                                                   key=torch.randn(1, 3, 1, 528).bfloat16(),
                                                   value=torch.randn(1, 3, 1, 528).bfloat16(), num_heads=1,
                                                   num_key_value_heads=1)),
    ("npu_fused_infer_attention_score", 8076, _fia(atten_mask=torch.zeros(5, 7))),  # float mask
    ("npu_fused_infer_attention_score", 8076, _fia(atten_mask=torch.zeros(7, 5, dtype=torch.bool).T)),
    ("npu_fused_infer_attention_score", 8214, _fia(sparse_mode=3)),  # no mask
    ("npu_fused_infer_attention_score", 8214, _fia(sparse_mode=2, atten_mask=torch.ones(5, 7, dtype=torch.bool))),
    ("npu_fused_infer_attention_score", 8214, _fia(sparse_mode=3, atten_mask=_compressed().T.contiguous())),
    ("npu_fused_infer_attention_score", 8078, _fia(atten_mask=torch.zeros(2, 4, 5, 7, dtype=torch.bool))),
    ("npu_fused_infer_attention_score", 8119, _fia(sparse_mode=1)),
    ("npu_all_gather_base_mm", 10188, _ag(self=torch.randn(4, 256), x2=torch.randn(256, 8))),  # fp32
    ("npu_all_gather_base_mm", 10189, _ag(x2=torch.randn(256, 8).half())),
    ("npu_all_gather_base_mm", 10188, _ag(self=torch.randn(4, 128).bfloat16(), x2=torch.randn(128, 8).bfloat16())),
    ("npu_all_gather_base_mm", 10193, _ag(bias=torch.zeros(8).bfloat16())),
    ("npu_all_gather_base_mm", 10198, _ag(comm_turn=1)),
    ("npu_all_gather_base_mm", 10215, _ag(self=torch.randn(256, 4).bfloat16().T)),
    ("npu_all_gather_base_mm", 10190, _ag()),  # hcom names no communicator
    ("npu_mm_reduce_scatter_base", 10429, _in_inference_mode(_rs())),
    ("npu_mm_reduce_scatter_base", 10409, _rs(self=torch.randn(4, 256), x2=torch.randn(256, 8))),
    ("npu_mm_reduce_scatter_base", 10410, _rs(x2=torch.randn(256, 8).half())),
    ("npu_mm_reduce_scatter_base", 10431, _rs(self=torch.randn(4, 65535).bfloat16(),
                                              x2=torch.randn(65535, 1).bfloat16())),
    ("npu_mm_reduce_scatter_base", 10415, _rs(bias=torch.zeros(8).bfloat16())),
    ("npu_mm_reduce_scatter_base", 10418, _rs(comm_turn=1)),
    ("npu_mm_reduce_scatter_base", 10435, _rs(self=torch.randn(256, 4).bfloat16().T)),
    ("npu_mm_reduce_scatter_base", 10411, _rs()),
]
# Rules that need a communicator: tested on two processes (test_mc2_kernels_on_two_processes) or one (below).
RULES_ELSEWHERE = {10191, 10412, 10196, 10414, 10432}


@pytest.mark.parametrize("op,line,call", RULES, ids=[f"{op}:{line}:{i}" for i, (op, line, _) in enumerate(RULES)])
def test_each_documented_constraint_is_refused_with_its_doc_line(op, line, call):
    with pytest.raises(emu.NpuOpError) as e:
        call()
    message = str(e.value)
    assert message.startswith(f"{op}: ") and message.endswith(f"(torch_npu _op_plugin_docs.py:{line})"), message


def test_every_rule_in_the_emulator_has_a_refusal_test():
    """Every doc line the emulator's checks cite (the line numbers in ``_check`` / ``_mc2_operands`` /
    ``_communicator`` calls) is in RULES or tested on a communicator."""
    cited = set()
    for node in ast.walk(ast.parse(EMULATOR_SRC.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("_check", "_mc2_operands", "_communicator"):
            for arg in node.args[1:]:
                cited |= {n.value for n in ast.walk(arg) if isinstance(n, ast.Constant) and type(n.value) is int
                          and 1000 <= n.value < 20000}
            if node.func.id == "_communicator":
                cited |= {n.value + 1 for n in node.args[1:2] if isinstance(n, ast.Constant)}
    assert cited and cited <= {line for _, line, _ in RULES} | RULES_ELSEWHERE, \
        cited - {line for _, line, _ in RULES} - RULES_ELSEWHERE


def test_cited_lines_are_in_each_ops_docs_and_quotes_are_verbatim():
    """Each refusal's line lies in its op's block of the wheel's docs; each 「quote」 after a line number in the
    emulator's comments is on that line (fragments around … in order)."""
    lines = _docs_lines()
    blocks = _doc_blocks(lines)
    for op, line, _ in RULES + [("npu_all_gather_base_mm", 10191, None), ("npu_all_gather_base_mm", 10196, None),
                                ("npu_mm_reduce_scatter_base", 10412, None),
                                ("npu_mm_reduce_scatter_base", 10414, None),
                                ("npu_mm_reduce_scatter_base", 10432, None)]:
        first, last = blocks[op]
        assert first <= line <= last, (op, line, blocks[op])
    # a quote may go on in the next comment lines: join each comment line to the one before
    comments = re.sub(r"\n\s*#(?! \d+「)", "", EMULATOR_SRC.read_text())
    quotes = re.findall(r"(?<![\d.])(\d{4,5})「(.*?)」", comments)
    assert len(quotes) > 30
    squeeze = lambda t: re.sub(r"\s+", "", t)
    for number, quote in quotes:
        text, pos = squeeze(lines[int(number) - 1]), 0
        for fragment in (squeeze(f) for f in quote.split("…") if f.strip()):
            pos = text.find(fragment, pos)
            assert pos >= 0, (number, fragment, text)


def test_mc2_world_size_must_be_the_communicators(cpu_device):
    """This process is a one-rank group: world_size 2 does not describe it (docs 10191, 10412)."""
    hcom = torch.distributed.distributed_c10d._get_default_group().group_name
    for fn, line in ((_ag, 10191), (_rs, 10412)):
        with pytest.raises(emu.NpuOpError, match=f"_op_plugin_docs.py:{line}"):
            fn(hcom=hcom)()


# ------------------------------------------------------------------------------------- NpuFlashAttention, MC2 checks
def _attention(training, dtype=torch.bfloat16, d=16, heads=8, groups=4):
    """An NpuFlashAttention layer (causal self-attention) of a TINY-shaped model with head dim ``d``."""
    from megatron.core.transformer.enums import AttnMaskType

    from aquila_npu.device.npu_modules import NpuFlashAttention
    from aquila_npu.models.config import transformer_config
    from aquila_npu.testing.tiny_hf import TINY

    spec = TINY.replace(hidden_size=d * heads, num_attention_heads=heads, num_key_value_heads=groups)
    module = NpuFlashAttention(transformer_config(spec, params_dtype=dtype), layer_number=1,
                               attn_mask_type=AttnMaskType.causal, attention_type="self")
    return module.train(training)


def _qkv(sq, sk, dtype, b=1, n=8, ng=4, d=16):
    torch.manual_seed(0)
    return (torch.randn(sq, b, n, d, dtype=dtype), torch.randn(sk, b, ng, d, dtype=dtype),
            torch.randn(sk, b, ng, d, dtype=dtype))


def _reference(q, k, v, masked):
    """sbhd in, [sq, b, n*d] out, fp32."""
    out = _sdpa_reference(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), masked, q.shape[-1] ** -0.5)
    return out.permute(2, 0, 1, 3).reshape(q.shape[0], q.shape[1], -1)


@pytest.mark.parametrize("s,mode", [(64, 0), (2050, 2)])
def test_flash_attention_training_causal_sparse_mode_and_one_cached_mask(cpu_device, s, mode):
    """Up to 2048 tokens sparse_mode 0 with an [S, S] mask, beyond sparse_mode 2 with the compressed 2048x2048 mask:
    one mask per (size, device), shared across calls; gradients flow."""

    q, k, v = (t.requires_grad_() for t in _qkv(s, s, torch.float32, n=2, ng=1))
    seen = []
    with emu.installed() as fake:
        real = fake.npu_fusion_attention
        fake.npu_fusion_attention = lambda *a, **kw: seen.append(kw) or real(*a, **kw)
        module = _attention(training=True, dtype=torch.float32, heads=2, groups=1)
        out = module(q, k, v, None)
        module(q, k, v, None)
    assert [kw["sparse_mode"] for kw in seen] == [mode, mode]
    assert seen[0]["atten_mask"] is seen[1]["atten_mask"] is shared_causal_mask(min(s, 2048), min(s, 2048), q.device)
    assert (out - _reference(q, k, v, torch.ones(s, s, dtype=torch.bool).triu(1))).abs().max() <= 1e-4
    out.sum().backward()
    assert q.grad is not None and k.grad is not None


def test_flash_attention_inference_uses_the_inference_kernel(cpu_device):
    """Eval mode: npu_fused_infer_attention_score for the causal prompt (sparse_mode 3, compressed mask) and for a
    decoding step (Q_S 1 over the whole cache, no mask), never the training kernel."""
    from megatron.core.transformer.enums import AttnMaskType

    q, k, v = _qkv(6, 6, torch.bfloat16, b=2)
    with emu.installed() as fake, torch.inference_mode():
        module = _attention(training=False)
        prompt = module(q, k, v, None)
        step = module(q[-1:], k, v, None, attn_mask_type=AttnMaskType.no_mask)  # megatron-core after the prompt
        assert fake.calls["npu_fused_infer_attention_score"] == 2 and fake.calls["npu_fusion_attention"] == 0
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    assert (prompt.float() - _reference(q, k, v, causal)).abs().max() <= 3e-2
    assert (step.float() - _reference(q[-1:], k, v, None)).abs().max() <= 3e-2


@pytest.mark.parametrize("dtype,d", [(torch.float32, 16), (torch.bfloat16, 8)])
def test_flash_attention_inference_outside_the_kernels_limits_runs_the_plain_path(cpu_device, dtype, d):
    """fp32 (docs 8065) or a head dim that is not a multiple of 16 (8210): plain attention, with a warning naming
    --use-flash-attn; training keeps npu_fusion_attention."""
    from aquila_npu.device import npu_modules

    npu_modules._warn_plain_inference.cache_clear()  # it warns once per process and reason
    q, k, v = _qkv(6, 6, dtype, d=d)
    with emu.installed() as fake, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = _attention(training=False, dtype=dtype, d=d)
        with torch.no_grad():
            out = module(q, k, v, None)
        assert sum(fake.calls.values()) == 0
        module.train()
        module(q, k, v, None)
        assert fake.calls["npu_fusion_attention"] == 1
    assert any("--use-flash-attn" in str(w.message) and "plain" in str(w.message) for w in caught)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert (out.float() - _reference(q, k, v, torch.ones(6, 6, dtype=torch.bool).triu(1))).abs().max() <= tol


def test_mc2_linears_refuse_what_the_kernels_cannot_do():
    from types import SimpleNamespace

    from aquila_npu.device.npu_modules import check_mc2
    from aquila_npu.errors import FusedKernelUnavailable, UsageError

    ok = SimpleNamespace(sequence_parallel=True, params_dtype=torch.bfloat16)
    check_mc2(ok, 2, (512, 256))
    with pytest.raises(UsageError, match="--use-mc2.*--sequence-parallel"):
        check_mc2(SimpleNamespace(sequence_parallel=False, params_dtype=torch.bfloat16), 2, (512,))
    with pytest.raises(UsageError, match="--tensor-model-parallel-size 2, 4 or 8"):
        check_mc2(ok, 16, (512,))
    with pytest.raises(FusedKernelUnavailable, match="--use-mc2.*--bf16"):
        check_mc2(SimpleNamespace(sequence_parallel=True, params_dtype=torch.float32), 2, (512,))
    with pytest.raises(FusedKernelUnavailable, match=r"\[256, 65535\).*128"):
        check_mc2(ok, 2, (512, 128))


def test_use_mc2_is_a_switch_of_the_npu_backend_only(tmp_path, capsys):
    """--use-mc2 swaps in the MC2 linears on npu; cuda and cpu refuse it; FusedOps.all() (every kernel) leaves it off;
    generation refuses it (no sequence parallelism there), in one line."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from aquila_npu.cli.generate import main as generate
    from aquila_npu.device import npu_modules
    from aquila_npu.device.backends import CpuBackend, CudaBackend, FusedOps, NpuBackend
    from aquila_npu.errors import FusedKernelUnavailable
    from helpers import call_main

    class Args:
        use_mc2, use_flash_attn = True, False

    assert FusedOps.from_args(Args) == FusedOps(mc2=True) and not FusedOps.all().mc2
    mc2 = NpuBackend(FusedOps(mc2=True))
    assert mc2.column_parallel_linear() is npu_modules.Mc2ColumnParallelLinear
    assert mc2.row_parallel_linear() is npu_modules.Mc2RowParallelLinear
    plain = NpuBackend(FusedOps.all())
    assert (plain.column_parallel_linear(), plain.row_parallel_linear()) == (ColumnParallelLinear, RowParallelLinear)
    for backend in (CudaBackend, CpuBackend):
        with pytest.raises(FusedKernelUnavailable, match="--use-mc2"):
            backend(FusedOps(mc2=True))
    rc, err = call_main(generate, ["--load", tmp_path, "--tokenizer-name-or-path", tmp_path, "--prompt", "x",
                                   "--use-mc2"], capsys)
    assert rc == 2 and "--use-mc2" in err and "sequence parallelism" in err


def test_mc2_linear_without_sequence_parallelism_is_refused_when_built(cpu_device):
    from aquila_npu.device.npu_modules import Mc2ColumnParallelLinear, Mc2RowParallelLinear
    from aquila_npu.errors import UsageError
    from aquila_npu.models.config import transformer_config
    from aquila_npu.testing.tiny_hf import TINY

    cfg = transformer_config(TINY.replace(hidden_size=512), params_dtype=torch.bfloat16)
    for cls, kw in ((Mc2ColumnParallelLinear, {}), (Mc2RowParallelLinear, {"input_is_parallel": True})):
        with pytest.raises(UsageError, match="--use-mc2 .*--sequence-parallel"):
            cls(512, 512, config=cfg, init_method=torch.nn.init.zeros_, bias=False, skip_bias_add=True, **kw)


def test_hccl_comm_name_asks_the_groups_npu_backend_with_the_global_rank(monkeypatch):
    """As torch_npu's docs do (10240): ``group._get_backend(torch.device("npu")).get_hccl_comm_name(global rank)``."""
    try:
        torch.device("npu")
    except RuntimeError:
        pytest.skip("torch.device('npu') needs torch_npu or the fake NPU runtime (issue 13 section 1)")
    from aquila_npu.device.npu_modules import hccl_comm_name

    asked = []

    class Backend:
        def get_hccl_comm_name(self, rank):
            asked.append(rank)
            return "hcom-name"

    class Group:
        def _get_backend(self, device):
            asked.append(device)
            return Backend()

    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(torch.distributed, "get_global_rank", lambda group, rank: rank + 4)
    assert hccl_comm_name(Group()) == "hcom-name" and asked == [torch.device("npu"), 5]


# ------------------------------------------------------------------------------------------ MC2 on two processes
MC2_WORKER = r'''
import json, sys
import torch
from aquila_npu.testing.npu import ops as emu

out_path = sys.argv[1]
torch.distributed.init_process_group("gloo")
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
group = torch.distributed.new_group([0, 1])
hcom = group.group_name
result = {}
torch.manual_seed(0)
x_all = torch.randn(8, 256).bfloat16()  # 4 rows per rank
w = torch.randn(256, 16).bfloat16()
mine = x_all[rank * 4:(rank + 1) * 4].contiguous()
out, gathered = emu.npu_all_gather_base_mm(mine, w, hcom, world)
result["all_gather_mm"] = torch.equal(gathered, x_all) and torch.equal(out, torch.matmul(x_all, w))
x = torch.randn(8, 256).bfloat16() * (rank + 1)
mm = torch.matmul(x, w)
everyone = [torch.empty_like(mm) for _ in range(world)]
torch.distributed.all_gather(everyone, mm, group=group)
expect = sum(e.float() for e in everyone)[rank * 4:(rank + 1) * 4]
got = emu.npu_mm_reduce_scatter_base(x, w, hcom, world)
result["mm_reduce_scatter"] = float((got.float() - expect).abs().max() / expect.abs().max())
refused = {}
for name, call in (("gather_index", lambda: emu.npu_all_gather_base_mm(mine, w, hcom, world, gather_index=1)),
                   ("reduce_op", lambda: emu.npu_mm_reduce_scatter_base(x, w, hcom, world, reduce_op="max")),
                   ("m", lambda: emu.npu_mm_reduce_scatter_base(x[:3].contiguous(), w, hcom, world))):
    try:
        call()
    except emu.NpuOpError as e:
        refused[name] = str(e)
result["refused"] = refused
if rank == 0:
    json.dump(result, open(out_path, "w"))
'''


def test_mc2_kernels_on_two_processes(tmp_path):
    """AllGatherMatmul and MatmulReduceScatter equal the collective + matmul they fuse; the rules that need a
    communicator (gather_index 0, reduce_op 'sum', m divisible by world_size) refuse."""
    worker = tmp_path / "mc2_worker.py"
    worker.write_text(MC2_WORKER)
    torchrun(str(worker), 2, [tmp_path / "out.json"], timeout=300)
    r = json.loads((tmp_path / "out.json").read_text())
    assert r["all_gather_mm"] is True
    assert r["mm_reduce_scatter"] <= 1e-2  # bf16 partial products summed: relative to the largest entry
    assert r["refused"]["gather_index"].endswith("_op_plugin_docs.py:10196)")
    assert r["refused"]["reduce_op"].endswith("_op_plugin_docs.py:10414)")
    assert r["refused"]["m"].endswith("_op_plugin_docs.py:10432)")


MC2_MODEL = ["--num-layers", 2, "--hidden-size", 512, "--ffn-hidden-size", 1024, "--num-attention-heads", 8,
             "--group-query-attention", "--num-query-groups", 4, "--vocab-size", 1000, "--seq-length", 64,
             "--max-position-embeddings", 64]


def test_mc2_tp2_sequence_parallel_training_gives_the_losses_of_plain_collectives(tmp_path):
    """tp2 with sequence parallelism, bf16, every fused kernel, on two fake NPUs (``--device npu`` through the fake
    runtime: the communicator's name comes from its hccl backend, as torch_npu's docs say): --use-mc2 (the all-gather
    and reduce-scatter inside the matmul kernels, forward and backward) gives the losses and gradient norms of
    megatron-core's own collectives."""
    runs = {}
    for mc2 in (False, True):
        metrics, reports = tmp_path / f"m{mc2}.jsonl", tmp_path / f"reports{mc2}"
        torchrun("-m aquila_npu.pretrain", 2, [
            "--device", "npu", "--mock-data", *MC2_MODEL, "--micro-batch-size", 2, "--global-batch-size", 4,
            "--train-iters", 3, "--lr", 1e-3, "--log-interval", 1, "--tensor-model-parallel-size", 2,
            "--sequence-parallel", "--bf16", "--use-flash-attn", "--use-fused-rmsnorm", "--use-fused-rotary-pos-emb",
            "--use-fused-swiglu", "--metrics-file", metrics, *(["--use-mc2"] if mc2 else [])],
            timeout=600, env=fake_npu_env(AQUILA_FAKE_NPU_REPORT=reports))
        recs = [json.loads(line) for line in metrics.read_text().splitlines()]
        calls = {}
        for report in reports.glob("rank0-*.json"):
            for op, n in json.loads(report.read_text())["calls"].items():
                calls[op] = calls.get(op, 0) + n
        runs[mc2] = ([r["lm_loss"] for r in recs if "lm_loss" in r], [r["grad_norm"] for r in recs if "grad_norm" in r],
                     calls)
    (plain_loss, plain_norm, plain_calls), (mc2_loss, mc2_norm, mc2_calls) = runs[False], runs[True]
    assert len(plain_loss) == len(mc2_loss) == 3 and len(set(plain_loss)) == 3  # the weights move
    assert max(abs(a - b) / abs(a) for a, b in zip(plain_loss, mc2_loss)) < 1e-5, (plain_loss, mc2_loss)
    assert max(abs(a - b) / abs(a) for a, b in zip(plain_norm, mc2_norm)) < 1e-5, (plain_norm, mc2_norm)
    # 2 layers x (qkv, fc1) forward + (proj, fc2) backward, per micro-batch; none without --use-mc2
    assert mc2_calls["npu_all_gather_base_mm"] > 0 and mc2_calls["npu_mm_reduce_scatter_base"] > 0
    assert "npu_all_gather_base_mm" not in plain_calls and plain_calls["npu_fusion_attention"] > 0
