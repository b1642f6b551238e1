"""Baichuan2 (issue 25): the registry entries, the W_pack rows of the weight table, NormHead, the HF folder.

The reference is not our code: Baichuan2-7B's math (``modeling_baichuan.py``: RMSNorm, RoPE rotate-half, SwiGLU, an
attention whose ``W_pack`` product is unflattened into (3, hidden) = q, k, v, and ``NormHead``: ``F.linear(h,
F.normalize(lm_head.weight))``) is Llama's once ``W_pack`` is split into q / k / v and the output rows normalised. So
transformers' ``LlamaForCausalLM`` holding those transformed weights gives the logits and greedy tokens our
megatron-core model must give from the raw Baichuan2 weights (fp32, within 1e-4, tp1 and tp2-pp2, forked ranks through
``aquila_npu.testing.parity_worker``). NormHead's gradient: the same Llama with its ``lm_head`` replaced by a NormHead
written here from Baichuan2's code (its raw weight the parameter) gives the gradients of our training forward.
"""

import contextlib
import functools
import io
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from helpers import assert_one_line_error, forked_ranks

from aquila_npu.models.hf_config import spec_from_hf_config
from aquila_npu.models.registry import MODELS, get_model_spec
from aquila_npu.weights import seeded
from aquila_npu.weights.mapping import Layout, hf_names, hf_shapes, hf_stage_to_mcore, mcore_stage_to_hf

TINY = get_model_spec("baichuan2-tiny")  # 7B-shaped: W_pack, NormHead, RoPE; 8 heads, 4 layers, vocab 1003
TOKENS, KEEP, NEW = 40, 16, 12
LAYOUTS = ((1, 1), (2, 2))


# ---------------------------------------------------------------------------------------------------- the registry


@pytest.mark.parametrize("name,shape", [
    # (hidden, ffn, layers, heads, vocab, positions, position scheme) of baichuan-inc/Baichuan2-*/config.json
    ("baichuan2-7b", (4096, 11008, 32, 32, 125696, 4096, "rope")),
    ("baichuan2-7b-chat", (4096, 11008, 32, 32, 125696, 4096, "rope")),
    ("baichuan2-13b", (5120, 13696, 40, 40, 125696, 4096, "alibi")),
    ("baichuan2-13b-chat", (5120, 13696, 40, 40, 125696, 4096, "alibi")),
])
def test_registry_entries_have_baichuan2_shapes(name, shape):
    s = get_model_spec(name)
    assert (s.hidden_size, s.intermediate_size, s.num_layers, s.num_attention_heads, s.vocab_size,
            s.max_position_embeddings, s.position_embedding) == shape
    assert s.num_key_value_heads == s.num_attention_heads and s.rms_norm_eps == 1e-6
    assert (s.family, s.output_layer, s.tie_word_embeddings, s.is_aquila) == ("baichuan", "normhead", False, False)
    h, f, v, L = shape[0], shape[1], shape[4], shape[2]
    assert s.num_parameters() == L * (4 * h * h + 3 * h * f + 2 * h) + 2 * v * h + h  # W_pack is 3h x h
    assert hf_shapes(s)["model.layers.0.self_attn.W_pack.weight"] == (3 * h, h)


def test_only_aquila_entries_are_aquila():
    assert sorted(n for n, s in MODELS.items() if not s.is_aquila) == [
        "baichuan2-13b", "baichuan2-13b-chat", "baichuan2-7b", "baichuan2-7b-chat", "baichuan2-tiny",
        "baichuan2-tiny-alibi"]


def _baichuan_config(spec):
    """Baichuan2's own config.json keys (without the two we add)."""
    return {k: v for k, v in spec.to_hf_config().items() if k not in ("position_embedding_type", "norm_head")}


def test_hf_config_of_a_baichuan_folder(tmp_path):
    for name in ("baichuan2-7b", "baichuan2-13b-chat", "baichuan2-tiny", "baichuan2-tiny-alibi"):
        spec = get_model_spec(name)
        cfg = spec.to_hf_config()
        assert (cfg["model_type"], cfg["architectures"]) == ("baichuan", ["BaichuanForCausalLM"])
        assert spec_from_hf_config(cfg, name=name).replace(source=spec.source) == spec
    # Baichuan2's own config.json, no key of ours: vLLM's rules (hidden 4096: RoPE; vocab 125696: NormHead) ...
    for name in ("baichuan2-7b", "baichuan2-13b"):
        spec = get_model_spec(name)
        cfg = {k: v for k, v in _baichuan_config(spec).items() if k != "max_position_embeddings"}  # 13B has none
        got = spec_from_hf_config(cfg, name="some/Folder")
        assert (got.family, got.position_embedding, got.output_layer, got.max_position_embeddings) == \
            ("baichuan", spec.position_embedding, "normhead", 4096)
    # ... or the registry entry the folder is named after.
    d = tmp_path / "baichuan2-tiny"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(_baichuan_config(TINY)))
    got = spec_from_hf_config(d)
    assert (got.position_embedding, got.output_layer) == ("rope", "normhead")
    from aquila_npu.errors import NotAquilaConfig

    with pytest.raises(NotAquilaConfig, match="key/value heads"):
        spec_from_hf_config({**TINY.to_hf_config(), "num_key_value_heads": 2})


def test_alibi_is_refused_in_one_line_until_implemented():
    from aquila_npu.errors import UsageError
    from aquila_npu.models import variants

    with pytest.raises(UsageError, match="ALiBi"):
        variants.check(get_model_spec("baichuan2-13b"))
    with pytest.raises(UsageError, match="loss-chunk-size"):
        variants.check(TINY, loss_chunk_size=64)
    variants.check(get_model_spec("baichuan2-7b"))


# ---------------------------------------------------------------------------------------------- the weight table


def _llama_state(state, spec):
    """Baichuan2's weights as Llama's: W_pack unflattened into (3, hidden) = q, k, v (as modeling_baichuan.py does
    with its product), the lm_head rows normalised (NormHead)."""
    out = {}
    for name, t in state.items():
        if name.endswith("self_attn.W_pack.weight"):
            q, k, v = t.unflatten(0, (3, spec.hidden_size))
            for part, w in zip("qkv", (q, k, v)):
                out[name.replace("W_pack", f"{part}_proj")] = w.clone()
        elif name == "lm_head.weight":
            out[name] = F.normalize(t, dim=-1)
        else:
            out[name] = t.clone()
    return out


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (4, 2), (8, 4), (2, 2)])
def test_w_pack_round_trips_bit_for_bit(tp, pp):
    state = seeded.hf_weights(TINY, seed=3)
    assert sorted(state) == sorted(hf_names(TINY)) and "model.layers.0.self_attn.q_proj.weight" not in state
    layout = Layout(TINY, tp, pp)
    back = {}
    for stage in range(pp):
        back.update(mcore_stage_to_hf(hf_stage_to_mcore(state.__getitem__, layout, stage), layout, stage))
    assert sorted(back) == sorted(state)
    for k in state:
        assert torch.equal(back[k], state[k]), k


def test_w_pack_shards_are_the_aquila_rows_of_its_split():
    """The megatron-core shards of a W_pack are those of q / k / v given separately (the Llama table, whose grouped
    layout the Aquila2 parity tests check), at every TP rank; the output layer is the raw weight."""
    state = seeded.hf_weights(TINY, seed=4)
    llama = {k: v for k, v in _llama_state(state, TINY).items()}
    llama["lm_head.weight"] = state["lm_head.weight"]
    for tp in (1, 2, 4):
        ours = hf_stage_to_mcore(state.__getitem__, Layout(TINY, tp), 0)
        theirs = hf_stage_to_mcore(llama.__getitem__, Layout(TINY.replace(family="aquila"), tp), 0)
        for a, b in zip(ours, theirs):
            assert sorted(a) == sorted(b)
            for k in a:
                assert torch.equal(a[k], b[k]), (tp, k)


# ------------------------------------------------------------------------------------- logits against Llama


def _llama(spec, state):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = spec.replace(family="aquila", output_layer="linear").to_hf_config()
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")},
                                         attn_implementation="eager"))
    missing, unexpected = model.load_state_dict(_llama_state(state, spec), strict=False)
    assert not unexpected and not [k for k in missing if not k.endswith("inv_freq")], (missing, unexpected)
    return model.float().eval()


@torch.no_grad()
def _llama_reference(model, tokens, prompt, n):
    logits = model(input_ids=tokens).logits
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    greedy = []
    for _ in range(n):
        greedy.append(int(out.logits[0, -1].argmax()))
        out = model(input_ids=torch.tensor([[greedy[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return logits, greedy


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """Llama's logits and greedy tokens on the transformed weights; ours from the raw Baichuan2 weights at tp1 and
    tp2-pp2 (forked ranks)."""
    from aquila_npu.testing import parity_worker

    d = tmp_path_factory.mktemp("baichuan2-parity")
    state = seeded.hf_weights(TINY, seed=7, std=0.05)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, TINY.vocab_size, (2, TOKENS), generator=g)
    prompt = tokens[0, :TOKENS - KEEP].tolist()
    logits, greedy = _llama_reference(_llama(TINY, state), tokens, prompt, NEW)
    torch.save({TINY.name: {"spec": TINY.__dict__, "state": state, "tokens": tokens, "keep": KEEP, "prompt": prompt,
                            "new_tokens": NEW}}, d / "cases.pt")
    ours = {}
    for tp, pp in LAYOUTS:
        out, logs = d / f"tp{tp}-pp{pp}.pt", d / f"logs-tp{tp}-pp{pp}"
        logs.mkdir()
        codes = forked_ranks(functools.partial(parity_worker.run, str(d / "cases.pt"), str(out), tp, pp), tp * pp,
                             logs, timeout=900)
        assert codes == [0] * (tp * pp), [(p.name, p.read_text()[-3000:]) for p in sorted(logs.iterdir())]
        ours[tp, pp] = torch.load(out, weights_only=True)[TINY.name]
    return logits[:, -KEEP:], greedy, ours


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_logits_and_greedy_tokens_equal_llama_on_the_transformed_weights(tp, pp, parity):
    ref, greedy, ours = parity
    got = ours[tp, pp]
    assert got["logits"].shape == ref.shape
    diff = (got["logits"] - ref).abs().max().item()
    assert diff < 1e-4, f"tp{tp}-pp{pp}: max |diff| {diff:.3g} (logits up to {ref.abs().max():.3g})"
    assert got["greedy"].tolist() == greedy


def test_the_normhead_check_can_fail():
    """The check can fail: normalised rows give logits of a different scale than the raw weight (std 0.05, 64 wide:
    row norms ~0.4)."""
    state = seeded.hf_weights(TINY, seed=7, std=0.05)
    assert not torch.allclose(state["lm_head.weight"].norm(dim=-1), torch.ones(TINY.vocab_size), atol=0.1)


# ------------------------------------------------------------------------------ NormHead in training (tp1, here)


class BaichuanNormHead(torch.nn.Module):
    """Baichuan2's NormHead in training mode (modeling_baichuan.py): the raw weight is the parameter, normalised in
    the forward (``nn.functional.normalize``: L2 over dim 1)."""

    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone())

    def forward(self, hidden_states):
        return F.linear(hidden_states, F.normalize(self.weight))


@pytest.fixture(scope="module")
def grad_reference():
    """(HF built before the device layer's CPU redirection exists in this process.)"""
    state = seeded.hf_weights(TINY, seed=11, std=0.05)
    model = _llama(TINY, state).train()
    model.lm_head = BaichuanNormHead(state["lm_head.weight"])
    tokens = torch.randint(0, TINY.vocab_size, (2, 24), generator=torch.Generator().manual_seed(11))
    logits = model(input_ids=tokens).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, TINY.vocab_size), tokens[:, 1:].reshape(-1))
    loss.backward()
    grads = {"lm_head": model.lm_head.weight.grad.clone(), "norm": model.model.norm.weight.grad.clone(),
             "embed": model.model.embed_tokens.weight.grad.clone()}
    return state, tokens, loss.detach(), grads


def test_normhead_gradients_are_baichuan2s(grad_reference, cpu_device):
    from aquila_npu.checkpoint.load_model import build_stage
    from aquila_npu.models.norm_head import is_norm_head

    state, tokens, ref_loss, ref_grads = grad_reference
    layout = Layout(TINY)
    shard = hf_stage_to_mcore(state.__getitem__, layout, 0)[0]
    model, _ = build_stage(TINY, layout, cpu_device, shard, params_dtype=torch.float32, pp_rank=0)
    assert is_norm_head(model.output_layer)
    raw = model.output_layer.weight.detach().clone()
    model.train()
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand(tokens.shape[0], -1)
    logits = model(tokens, position_ids, None)[..., :TINY.vocab_size]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, TINY.vocab_size), tokens[:, 1:].reshape(-1))
    loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    got = {"lm_head": model.output_layer.weight.grad, "norm": model.decoder.final_layernorm.weight.grad,
           "embed": model.embedding.word_embeddings.weight.grad}
    for k, ref in ref_grads.items():
        diff = (got[k][:ref.shape[0]] - ref).abs().max().item()
        assert diff < 1e-5 * max(1.0, ref.abs().max().item()), f"{k}: max |diff| {diff:.3g}"
    # Training and inference forwards give the same logits; the parameter stays the raw weight (conversion keeps it).
    model.eval()
    with torch.no_grad():
        eval_logits = model(tokens, position_ids, None)[..., :TINY.vocab_size]
    assert torch.allclose(eval_logits, logits.detach(), atol=1e-6)
    assert torch.equal(model.output_layer.weight.detach(), raw)


# ----------------------------------------------------------------------------- conversion through the real command


def _convert(*args):
    from aquila_npu.cli.convert import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main([*map(str, args)])
    sys.stderr.write(err.getvalue())
    if rc == 2:
        assert_one_line_error(err.getvalue())
    return rc


def test_convert_hf_tp2_pp2_hf_bit_for_bit(tmp_path):
    from aquila_npu.checkpoint.megatron_io import CheckpointInfo

    src = tmp_path / "Baichuan2-tiny-hf"
    src.mkdir()
    state = seeded.hf_weights(TINY, seed=5, dtype=torch.bfloat16)
    save_file(state, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(TINY.replace(torch_dtype="bfloat16").to_hf_config()))
    assert _convert("--model-type", "GPT", "--loader", "llama2_hf", "--saver", "megatron", "--load-dir", src,
                    "--save-dir", tmp_path / "mg", "--target-tensor-parallel-size", 2,
                    "--target-pipeline-parallel-size", 2) == 0
    info = CheckpointInfo.read(str(tmp_path / "mg"))
    assert (info.spec.family, info.spec.output_layer, info.spec.position_embedding) == ("baichuan", "normhead", "rope")
    back = tmp_path / "hfsave"
    back.mkdir()
    (back / "config.json").write_text((src / "config.json").read_text())
    assert _convert("--model-type", "GPT", "--loader", "megatron", "--saver", "megatron", "--save-model-type",
                    "save_huggingface_llama", "--load-dir", tmp_path / "mg", "--save-dir", back) == 0
    out = load_file(str(back / "mg2hg" / "model.safetensors"))
    assert sorted(out) == sorted(state)
    for k in state:
        assert out[k].dtype == state[k].dtype and torch.equal(out[k], state[k]), k
    cfg = json.loads((back / "mg2hg" / "config.json").read_text())
    assert (cfg["model_type"], cfg["architectures"]) == ("baichuan", ["BaichuanForCausalLM"])


def test_normalised_rows_are_f_normalize_bit_for_bit_and_padding_gets_no_gradient():
    from aquila_npu.models.norm_head import normalised

    w = 0.05 * torch.randn(1004, 64, generator=torch.Generator().manual_seed(0))
    w[1003:] = 0  # megatron-core's vocabulary padding (the converter's zeros)
    g = torch.randn(1004, 64, generator=torch.Generator().manual_seed(1))
    ours, theirs = w.clone().requires_grad_(), w[:1003].clone().requires_grad_()
    normalised(ours).backward(g)
    F.normalize(theirs).backward(g[:1003])  # Baichuan2's NormHead
    assert torch.equal(normalised(w)[:1003], F.normalize(w[:1003])) and torch.equal(ours.grad[:1003], theirs.grad)
    assert torch.equal(ours.grad[1003:], torch.zeros(1, 64))  # F.normalize would give it 1e12 x its logit's


# ---------------------------------------------------------------------------- pretraining through the real command


def test_pretrain_losses_tp1_and_tp2_pp2_agree(tmp_path):
    """``aquila_npu.pretrain`` from one Baichuan2 HF model converted twice (tp1 with the vocabulary padded as tp2
    pads it), mock data: equal losses and gradient norms, the weights learn."""
    from helpers import assert_layouts_train_alike, torchrun, read_metrics
    from aquila_npu.checkpoint.convert import to_megatron
    from aquila_npu.checkpoint.hf_io import HFReader

    src = tmp_path / "hf"
    src.mkdir()
    save_file(seeded.hf_weights(TINY, seed=5), str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(TINY.to_hf_config()))
    to_megatron(HFReader(str(src)), str(tmp_path / "mg1"), 1, 1, make_vocab_size_divisible_by=2)
    to_megatron(HFReader(str(src)), str(tmp_path / "mg4"), 2, 2)
    common = ["--mock-data", "--finetune", "--train-iters", 4, "--micro-batch-size", 2, "--global-batch-size", 4,
              "--seq-length", 32, "--lr", 1e-3, "--lr-decay-style", "constant", "--log-interval", 1,
              "--eval-interval", 1000]
    torchrun("-m aquila_npu.pretrain", 1, [*common, "--load", tmp_path / "mg1",
                                            "--metrics-file", tmp_path / "tp1.jsonl"])
    torchrun("-m aquila_npu.pretrain", 4, [*common, "--load", tmp_path / "mg4", "--tensor-model-parallel-size", 2,
                                            "--pipeline-model-parallel-size", 2, "--sequence-parallel",
                                            "--metrics-file", tmp_path / "tp2pp2.jsonl"])
    runs = {"dir": tmp_path, **{n: (read_metrics(tmp_path / f"{n}.jsonl"), None) for n in ("tp1", "tp2pp2")}}
    assert_layouts_train_alike(runs)
    assert max(read_metrics(tmp_path / "tp1.jsonl", "grad_norm")) < 100  # the padded row gets no 1e12 gradient
