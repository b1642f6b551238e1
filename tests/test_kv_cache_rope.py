"""Keys enter megatron-core's static KV cache already rotated (aquila_npu.models.attention.SelfAttention).

Reference: megatron-core's own ``SelfAttention`` (which re-rotates the whole cache at every step) on the same weights:
logits of a prefill and of the decoding steps after it are bit-identical, and a decoding step no longer runs RoPE's
element-wise ops over every cached position.
"""

import torch
from megatron.core.transformer import attention as mcore_attention

from aquila_npu.inference.forward import inference_wrapper
from aquila_npu.models import gpt
from aquila_npu.models.attention import SelfAttention
from aquila_npu.models.config import transformer_config
from aquila_npu.testing.tiny_hf import TINY

PROMPT, STEPS, BATCH = 24, 5, 3


def _model(backend, attention_class, monkeypatch, state=None):
    monkeypatch.setattr(gpt, "SelfAttention", attention_class)
    torch.manual_seed(0)
    model = gpt.build_model(TINY, transformer_config(TINY, **backend.config_overrides()), backend,
                            padded_vocab=TINY.vocab_size, parallel_output=False).eval()
    if state is not None:
        model.load_state_dict(state)
    return model


def _cache_layout(shape, batch):
    return (len(shape) == 4 and shape[0] > 1 and shape[1] == batch and shape[3] == TINY.head_dim
            and shape[2] in (TINY.num_attention_heads, TINY.num_key_value_heads))


def _decode(model, tokens):
    """Logits of a prefill over the first PROMPT positions, then of each decoding step (one position each); and the
    shapes of the RoPE-sized element-wise ops each decoding step ran."""
    b, total = tokens.shape
    wrapper = inference_wrapper(model, b, total, TINY.vocab_size)
    positions = torch.arange(total).unsqueeze(0).expand(b, -1)
    logits = [wrapper.run_one_forward_step({"tokens": tokens[:, :PROMPT], "position_ids": positions[:, :PROMPT],
                                            "attention_mask": None})]
    wrapper.inference_context.enable_decode_mode()
    long_ops = []
    for end in range(PROMPT + 1, total + 1):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            logits.append(wrapper.run_one_forward_step({"tokens": tokens[:, end - 1:end],
                                                        "position_ids": positions[:, end - 1:end],
                                                        "attention_mask": None}))
        # RoPE over cached keys: operands in megatron-core's [s, b, heads or groups, head_dim] layout with s > 1
        # (attention's own tensors are [b, heads, ...]: torch 2.6's SDPA math path multiplies those)
        long_ops += [(e.key, shapes) for e in prof.key_averages(group_by_input_shape=True)
                     if e.key in ("aten::mul", "aten::add", "aten::cat")
                     for shapes in [e.input_shapes] if any(_cache_layout(s, b) for s in shapes if s)]
    return logits, long_ops


@torch.inference_mode()
def test_rotated_cache_equals_megatron_core_and_skips_the_cache_rope(cpu_device, monkeypatch):
    backend = cpu_device.backend
    ref_model = _model(backend, mcore_attention.SelfAttention, monkeypatch)
    ours_model = _model(backend, SelfAttention, monkeypatch, state=ref_model.state_dict())
    assert sum(isinstance(m, SelfAttention) for m in ours_model.modules()) == TINY.num_layers
    tokens = torch.randint(3, TINY.vocab_size, (BATCH, PROMPT + STEPS), generator=torch.Generator().manual_seed(1))
    ref, ref_long = _decode(ref_model, tokens)
    ours, ours_long = _decode(ours_model, tokens)
    assert len(ours) == STEPS + 1
    for a, b in zip(ref, ours):
        assert torch.equal(a, b)
    assert ref_long  # megatron-core rotates every cached key again at each step (what this test would catch) ...
    assert not ours_long, ours_long[:3]  # ... ours only the new one


def test_training_forward_is_megatron_cores(cpu_device, monkeypatch):
    """Without an inference context the class is megatron-core's: same logits and gradients."""
    backend = cpu_device.backend
    ref_model = _model(backend, mcore_attention.SelfAttention, monkeypatch).train()
    ours_model = _model(backend, SelfAttention, monkeypatch, state=ref_model.state_dict()).train()
    tokens = torch.randint(3, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(16).unsqueeze(0).expand(2, -1)
    outs = []
    for model in (ref_model, ours_model):
        logits = model(tokens, positions, None)
        logits.float().pow(2).mean().backward()
        outs.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1]):
        assert torch.equal(a, b)

