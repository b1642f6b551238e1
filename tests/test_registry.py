import json

import pytest
import torch.nn.functional as F

from aquila_npu.errors import CheckpointError, NotAquilaConfig
from aquila_npu.models.config import transformer_config
from aquila_npu.models.hf_config import spec_from_hf_config
from aquila_npu.models.registry import MODELS, get_model_spec


@pytest.mark.parametrize("name,published,tol", [
    # Published sizes (../shared/reference/aquila2.md, computed from the HF config.json): 7B ~ 7.296e9,
    # 34B ~ 33.69e9 (the "7B" / "34B" of the model names).
    ("aquila2-7b", 7.296e9, 0.001e9), ("aquila2-34b", 33.69e9, 0.01e9),
    ("aquilachat2-7b", 7.296e9, 0.001e9), ("aquilachat2-34b", 33.69e9, 0.01e9),
])
def test_parameter_counts(name, published, tol):
    assert abs(get_model_spec(name).num_parameters() - published) <= tol


def test_hand_count_7b():
    h, f, v, L = 4096, 11008, 100008, 32
    per_layer = 4 * h * h + 3 * h * f + 2 * h
    assert get_model_spec("aquila2-7b").num_parameters() == L * per_layer + 2 * v * h + h


def test_hand_count_34b_gqa():
    h, f, v, L, kv = 6144, 24576, 100008, 60, 8 * 128  # 8 key/value heads of dim 128
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    assert get_model_spec("aquila2-34b").num_parameters() == L * per_layer + 2 * v * h + h == 33_693_554_688


def test_real_shapes():
    s7, s34 = get_model_spec("aquila2-7b"), get_model_spec("aquila2-34b")
    assert (s7.hidden_size, s7.intermediate_size, s7.num_layers, s7.num_attention_heads, s7.num_key_value_heads,
            s7.vocab_size, s7.max_position_embeddings) == (4096, 11008, 32, 32, 32, 100008, 2048)
    assert (s34.hidden_size, s34.intermediate_size, s34.num_layers, s34.num_attention_heads, s34.num_key_value_heads,
            s34.vocab_size, s34.max_position_embeddings) == (6144, 24576, 60, 48, 8, 100008, 4096)
    assert all(m.source for m in MODELS.values())
    assert get_model_spec("AquilaChat2-7B-16K").rope_scaling_factor == 8.0


@pytest.mark.parametrize("name", sorted(MODELS))
def test_transformer_config(name):
    spec = get_model_spec(name)
    cfg = transformer_config(spec)
    assert cfg.normalization == "RMSNorm" and cfg.gated_linear_unit and cfg.activation_func is F.silu
    assert not cfg.add_bias_linear and not cfg.add_qkv_bias and not cfg.rotary_interleaved
    assert cfg.num_query_groups == spec.num_key_value_heads
    assert cfg.ffn_hidden_size == spec.intermediate_size and cfg.kv_channels == spec.head_dim
    assert cfg.layernorm_epsilon == spec.rms_norm_eps


def test_unknown_model():
    with pytest.raises(KeyError, match="known"):
        get_model_spec("aquila3-1t")


def test_hf_config_roundtrip_and_aquila_type(tmp_path):
    for name in ("aquila2-7b", "aquila2-34b", "aquilachat2-34b-16k"):
        spec = get_model_spec(name)
        cfg = spec.to_hf_config()
        back = spec_from_hf_config(cfg, name=name)
        assert back.replace(source=spec.source) == spec
    # Aquila2's own config: model_type aquila, no num_key_value_heads / rope_theta (defaults 32 heads, 10000).
    aquila = {"architectures": ["AquilaForCausalLM"], "model_type": "aquila", "hidden_size": 4096,
              "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 100008,
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "hidden_act": "silu", "bos_token_id": 100006,
              "eos_token_id": 100007, "pad_token_id": 0, "torch_dtype": "float16", "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(aquila))
    spec = spec_from_hf_config(tmp_path)
    assert spec.num_key_value_heads == 32 and spec.rope_theta == 10000.0
    assert spec.num_parameters() == get_model_spec("aquila2-7b").num_parameters()


@pytest.mark.parametrize("bad,match", [
    ({"model_type": "gpt2"}, "model_type"),
    ({"model_type": "llama", "hidden_size": 8}, "missing"),
    ({"model_type": "llama", "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
      "num_attention_heads": 2, "vocab_size": 10, "attention_bias": True}, "bias"),
])
def test_bad_hf_config(bad, match):
    with pytest.raises(NotAquilaConfig, match=match):
        spec_from_hf_config(bad)


def test_missing_hf_config(tmp_path):
    with pytest.raises(CheckpointError, match="config"):
        spec_from_hf_config(tmp_path)


def test_chat_template_is_recorded_from_the_model_name(tmp_path):
    """FlagAI picks the conversation template by model name; the converter records it in the spec (and so in the
    checkpoint's metadata), where generation's --chat finds it."""
    cfg = get_model_spec("aquilachat2-7b").to_hf_config()
    for folder, template in (("AquilaChat2-7B", "aquila-v1"), ("AquilaChat2-34B-16K", "aquila"),
                             ("Aquila2-7B", None), ("my-finetune", None)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_text(json.dumps(cfg))
        assert spec_from_hf_config(tmp_path / folder).chat_template == template, folder
    assert spec_from_hf_config(dict(cfg, _name_or_path="BAAI/AquilaChat2-34B")).chat_template == "aquila-legacy"
