"""Our megatron-core model with LoRA vs peft's PeftModel on the HF model (fp32, CPU; gloo processes under torchrun):
zero B leaves the logits identical to the base model's; non-zero adapters (fused q/k/v and gate/up split per query
group, and Aquila2's q/v adapters block-structured) give PeftModel's logits within 1e-4 at tp1-pp1 and tp2-pp2; the
trainable-parameter count equals peft's for the same modules (the fused linears' shared A counted once)."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from helpers import LORA_CASES as CASES
from helpers import LORA_HF_MODULES as HF_MODULES
from helpers import read_json, torchrun

from aquila_npu.lora import convert
from aquila_npu.lora.settings import LoraSettings
from aquila_npu.testing.tiny_hf import TINY, tiny_llama, tiny_peft
from aquila_npu.weights.mapping import LORA_TARGETS, Layout

R, ALPHA = 4, 8.0
ADAPTED = ("fused-all", "aquila2-qv")


@pytest.fixture(scope="module")
def peft_refs(tmp_path_factory):
    """PEFT adapters, their logits on fixed tokens (computed here: no device setup in this process)."""
    d = tmp_path_factory.mktemp("lora-model")
    tokens = torch.randint(3, TINY.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.save(tokens, d / "tokens.pt")
    out = {"dir": d, "tokens": str(d / "tokens.pt")}
    for case in ADAPTED:
        model = tiny_peft(seed=2, **CASES[case])
        model.save_pretrained(d / case)
        with torch.no_grad():
            torch.save(model(tokens).logits.float(), d / f"{case}.pt")
        out[case] = (str(d / case), str(d / f"{case}.pt"))
    return out


def _peft_trainable(modules):
    model = get_peft_model(tiny_llama(), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=modules))
    return model.get_nb_trainable_parameters()[0]


def _run(peft_refs, tmp_path, tp, pp):
    layout = Layout(TINY, tp, pp, make_vocab_size_divisible_by=8)
    cases = [{"name": "fresh", "settings": LoraSettings(LORA_TARGETS, R, ALPHA).to_dict()},
             {"name": "proj-fc2", "settings": LoraSettings(("linear_proj", "linear_fc2"), R, ALPHA).to_dict()}]
    for case in ADAPTED:
        peft_dir, ref = peft_refs[case]
        settings = convert.import_peft(peft_dir, str(tmp_path / case), layout)
        cases.append({"name": case, "settings": settings.to_dict(), "adapter": str(tmp_path / case),
                      "reference": ref})
    for c in cases:
        c["tokens"] = peft_refs["tokens"]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    torchrun("-m aquila_npu.testing.lora_check", tp * pp,
             ["--tp", tp, "--pp", pp, "--cases", tmp_path / "cases.json", "--out", tmp_path / "out.json"])
    return read_json(tmp_path / "out.json")


def _check(r):
    assert r["fresh"]["b0_equal"] and r["proj-fc2"]["b0_equal"]  # B = 0: the base model's logits, bit for bit
    per_layer_shared_a = 3 * R * TINY.hidden_size  # k/v share q's A, up shares gate's
    assert r["fresh"]["counts"]["trainable"] == _peft_trainable(HF_MODULES) - TINY.num_layers * per_layer_shared_a
    assert r["proj-fc2"]["counts"]["trainable"] == _peft_trainable(["o_proj", "down_proj"])
    for case in ADAPTED:
        assert r[case]["missing"] == [] and r[case]["unexpected"] == []
        assert r[case]["diff_vs_base"] > 1e-2  # the adapters do something
        assert r[case]["max_abs_diff"] < 1e-4, (case, r[case])


def test_tp1_pp1_logits_equal_peft(peft_refs, tmp_path):
    _check(_run(peft_refs, tmp_path, 1, 1))


@pytest.mark.slow
def test_tp2_pp2_logits_equal_peft(peft_refs, tmp_path):
    _check(_run(peft_refs, tmp_path, 2, 2))
