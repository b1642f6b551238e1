"""Every registry entry's distinctive numerics against Hugging Face: for each model (7B, 34B, the chat models, the 16K
models with linear RoPE scaling, the 2406 re-release with rope theta 1e6 and its larger vocabulary) a 2-layer model
with that entry's query/key-value head ratio, vocabulary, positions, RoPE theta and scaling, RMSNorm epsilon; HF's
``LlamaForCausalLM`` built from ``ModelSpec.to_hf_config()`` with random weights, mapped through the weight table into
our megatron-core model; fp32 logits must agree (in this process: no subprocess needed)."""

import pytest
import torch

from aquila_npu.models.registry import MODELS

# Llama-shaped families only (Baichuan2's W_pack and NormHead: tests/test_baichuan2.py).
AQUILA = sorted(n for n, s in MODELS.items() if s.is_aquila)
TOKENS = 48  # long enough for RoPE scaling and theta to change every position after the first


def tiny_version(spec):
    """The entry's head ratio with head dimension 16, two layers; everything else the entry's own."""
    ratio = spec.num_attention_heads // spec.num_key_value_heads
    heads, kv = 2 * ratio, 2
    return spec.replace(hidden_size=16 * heads, intermediate_size=40 * heads, num_layers=2, num_attention_heads=heads,
                        num_key_value_heads=kv)


@pytest.fixture(scope="module")
def references():
    """HF logits per entry, computed before the CPU redirection of the device layer exists in this process."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = {}
    for name, spec in ((n, MODELS[n]) for n in AQUILA):
        small = tiny_version(spec)
        torch.manual_seed(0)
        hf = LlamaForCausalLM(LlamaConfig(**small.to_hf_config(), attn_implementation="eager")).float().eval()
        tokens = torch.randint(0, small.vocab_size, (2, TOKENS))
        with torch.no_grad():
            logits = hf(tokens).logits
        out[name] = (small, hf.state_dict(), tokens, logits)
    return out


@pytest.mark.parametrize("name", AQUILA)
def test_logits_equal_hf_for_every_registry_entry(name, references, cpu_device):
    """(``references`` is built first: HF models before the device layer's CPU redirection.)"""
    from aquila_npu.checkpoint.load_model import build_stage
    from aquila_npu.inference.forward import forward_logits
    from aquila_npu.weights.mapping import Layout, hf_stage_to_mcore

    spec, state, tokens, ref = references[name]
    if name.endswith("16k"):
        assert spec.rope_scaling_factor in (4.0, 8.0)
    if name.endswith("2406"):
        assert (spec.rope_theta, spec.vocab_size) == (1e6, 143973)
    layout = Layout(spec, 1, 1)
    shard = hf_stage_to_mcore(state.__getitem__, layout, 0)[0]
    model, _ = build_stage(spec, layout, cpu_device, shard, params_dtype=torch.float32, pp_rank=0)
    ours = forward_logits(model, tokens)[..., : spec.vocab_size]
    assert ours.shape == ref.shape
    scale = ref.abs().max().item()
    assert (ours - ref).abs().max().item() < 1e-4 * max(scale, 1.0), name
    # a RoPE mistake (theta, scaling) changes later positions: they must agree as well as the first
    assert torch.equal(ours[:, -1].argmax(-1), ref[:, -1].argmax(-1))
