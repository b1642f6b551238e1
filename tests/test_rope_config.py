"""RoPE scaling in every form transformers has written a config.json with (issue 24): ``rope_scaling`` with ``type``
(transformers 4 before 4.45) or ``rope_type``, and transformers 5's ``rope_parameters`` (no ``rope_scaling`` key).
A 16K model saved again with transformers 5 (after a merge, a fine-tune) used to convert without its scaling. Each
form is read as transformers itself reads it; a scaling we do not implement is refused in one line naming it."""

import json

import pytest

from helpers import call_main

from aquila_npu.errors import NotAquilaConfig
from aquila_npu.models.hf_config import spec_from_hf_config
from aquila_npu.models.registry import MODELS

SCALED = sorted(n for n, s in MODELS.items() if s.rope_scaling_factor)
FORMS = {
    "type": {"rope_scaling": {"type": "linear", "factor": 8.0}},  # BAAI's 16K config.json
    "rope_type": {"rope_scaling": {"rope_type": "linear", "factor": 8.0}},
    "rope_parameters": {"rope_parameters": {"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0}},
    "both": {"rope_scaling": {"type": "linear", "factor": 8.0},
             "rope_parameters": {"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0}},
}


def _config(**rope):
    cfg = {k: v for k, v in MODELS["aquilachat2-7b"].to_hf_config().items() if k not in ("rope_scaling",)}
    cfg.update(rope)
    return cfg


def test_scaled_entries_exist():
    assert SCALED and all(MODELS[n].max_position_embeddings == 16384 for n in SCALED)


@pytest.mark.parametrize("name", SCALED)
def test_a_16k_config_saved_by_transformers_keeps_its_scaling(name, tmp_path):
    """What transformers (5) writes for a 16K model is read with the entry's factor, whatever key it chose."""
    from transformers import LlamaConfig

    spec = MODELS[name]
    LlamaConfig(**spec.to_hf_config()).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_scaling" in written or "rope_parameters" in written
    assert spec_from_hf_config(tmp_path).rope_scaling_factor == spec.rope_scaling_factor


@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_form_reads_as_transformers_reads_it(form):
    from transformers import LlamaConfig

    cfg = _config(**FORMS[form])
    theirs = LlamaConfig(**json.loads(json.dumps(cfg))).rope_parameters
    assert theirs["rope_type"] == "linear"
    assert spec_from_hf_config(cfg).rope_scaling_factor == float(theirs["factor"]) == 8.0


def test_default_forms_have_no_scaling_and_theta_as_transformers_reads_it():
    from transformers import LlamaConfig

    for rope in ({}, {"rope_scaling": None}, {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}):
        cfg = _config(**rope)
        spec = spec_from_hf_config(cfg)
        assert spec.rope_scaling_factor is None
        assert spec.rope_theta == LlamaConfig(**json.loads(json.dumps(cfg))).rope_parameters["rope_theta"]
    assert spec_from_hf_config(_config(rope_parameters={"rope_type": "default", "rope_theta": 1e6})).rope_theta == 1e6


@pytest.mark.parametrize("kind,named", [("dynamic", "dynamic NTK"), ("yarn", "YaRN"), ("llama3", "Llama 3"),
                                        ("longrope", "LongRoPE"), ("mystery", "unknown")])
@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_an_unimplemented_scaling_is_refused_by_name(kind, named, key):
    with pytest.raises(NotAquilaConfig, match=f"{key} type '{kind}' .*{named}"):
        spec_from_hf_config(_config(**{key: {"rope_type": kind, "factor": 2.0}}))


def test_disagreeing_forms_are_refused():
    with pytest.raises(NotAquilaConfig, match="disagree"):
        spec_from_hf_config(_config(rope_scaling={"type": "linear", "factor": 8.0},
                                    rope_parameters={"rope_type": "linear", "factor": 4.0}))


def test_a_16k_model_saved_by_transformers_converts_with_its_scaling(tmp_path):
    """HF folder written by transformers' save_pretrained (a tiny 16K-shaped model) -> Megatron -> HF: the factor
    survives both ways."""
    from aquila_npu.checkpoint.convert import to_huggingface, to_megatron
    from aquila_npu.checkpoint.hf_io import HFReader
    from aquila_npu.checkpoint.megatron_io import CheckpointInfo, MegatronReader
    from aquila_npu.testing.tiny_hf import tiny_llama

    spec = MODELS["aquila2-tiny-gqa"].replace(rope_scaling_factor=8.0)
    tiny_llama(spec).save_pretrained(tmp_path / "hf")
    assert "rope_scaling" not in json.loads((tmp_path / "hf" / "config.json").read_text())  # transformers 5's form
    to_megatron(HFReader(str(tmp_path / "hf")), str(tmp_path / "mg"), 1, 1)
    assert CheckpointInfo.read(str(tmp_path / "mg")).spec.rope_scaling_factor == 8.0
    to_huggingface(MegatronReader(str(tmp_path / "mg")), str(tmp_path / "back"))
    assert spec_from_hf_config(tmp_path / "back").rope_scaling_factor == 8.0


def test_the_converter_refuses_dynamic_ntk_in_one_line(tmp_path, capsys):
    from aquila_npu.cli.convert import main
    from aquila_npu.testing.tiny_hf import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    rc, err = call_main(main, ["--model-type", "GPT", "--loader", "llama2_hf", "--saver", "megatron", "--load-dir",
                               tmp_path / "hf", "--save-dir", tmp_path / "mg"], capsys)
    assert rc == 2 and "rope_scaling type 'dynamic' (dynamic NTK) is not implemented" in err
    assert not (tmp_path / "mg").exists()
