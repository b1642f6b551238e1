"""LoRA conversions against peft itself (CPU, one process): the adapter rows of the mapping table split like the
base weights, merging equals ``merge_and_unload()`` tensor for tensor, export -> ``PeftModel.from_pretrained`` ->
import is bit for bit, a Hugging Face q/v adapter (Aquila2's finetune_lora.sh) imports exactly, bad input fails
clearly."""

import argparse
import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import load_peft_weights, set_peft_model_state_dict
from safetensors.torch import load_file

from aquila_npu.checkpoint.convert import to_huggingface, to_megatron
from aquila_npu.checkpoint.hf_io import HFReader
from aquila_npu.checkpoint.megatron_io import MegatronReader
from aquila_npu.errors import CheckpointError, UsageError
from aquila_npu.lora import convert
from aquila_npu.lora.checkpoint import AdapterCheckpoint
from aquila_npu.lora.settings import LoraSettings, resolve
from aquila_npu.testing.tiny_hf import TINY, tiny_llama, tiny_peft
from aquila_npu.weights.mapping import (LORA_PAIRS, TABLE, Layout, hf_names, hf_rank_to_mcore, hf_shapes,
                                        lora_rows, lora_target, mcore_stage_to_hf, rank_slice)
from helpers import LORA_CASES as CASES
from helpers import LORA_HF_MODULES as HF_MODULES


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny HF model and its tp2-pp2 Megatron conversion."""
    d = tmp_path_factory.mktemp("lora-base")
    tiny_llama().save_pretrained(d / "hf")
    to_megatron(HFReader(str(d / "hf")), str(d / "mg"), 2, 2, make_vocab_size_divisible_by=8)
    return {"hf": str(d / "hf"), "mg": str(d / "mg"), "layout": convert.layout_of_base(str(d / "mg"))}


def _peft_dir(tmp_path, case, seed=1):
    model = tiny_peft(seed=seed, **CASES[case])
    model.save_pretrained(tmp_path / f"peft-{case}")
    return model, str(tmp_path / f"peft-{case}")


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2), (4, 1)])
def test_adapter_rows_split_as_the_base_weight_and_gather_exactly(tp, pp):
    """Per TP shard, W_shard + B_shard A_shard is the shard of W + B A (what merging per shard relies on), and
    splitting then gathering the adapter is the identity."""
    layout = Layout(TINY, tp, pp)
    rows = lora_rows()
    g = torch.Generator().manual_seed(0)
    shapes = hf_shapes(TINY)
    peft, delta = {}, {}
    for row in TABLE:
        t = lora_target(row)
        if t is None:
            continue
        row_a, row_b = LORA_PAIRS[t]
        for i in range(TINY.num_layers):
            a = torch.randn(3, shapes[row.hf[0].format(i=i)][1], generator=g, dtype=torch.float64)
            for name, name_a, name_b in zip(row.hf, row_a.hf, row_b.hf):
                b = torch.randn(shapes[name.format(i=i)][0], 3, generator=g, dtype=torch.float64)
                peft[name_a.format(i=i)], peft[name_b.format(i=i)] = a, b
                delta[name.format(i=i)] = b @ a
    back = {}
    for stage in range(pp):
        shards = [hf_rank_to_mcore(peft.__getitem__, layout, stage, r, table=rows) for r in range(tp)]
        back.update(mcore_stage_to_hf(shards, layout, stage, rows))
        for r, sd in enumerate(shards):
            for local, i in enumerate(layout.stage_layers(stage)):
                for row in TABLE:
                    t = lora_target(row)
                    if t is None:
                        continue
                    prefix = row.mcore.format(i=local).replace(".weight", "")
                    a, b = sd[f"{prefix}.lora_A.default.weight"], sd[f"{prefix}.lora_B.default.weight"]
                    want = rank_slice(row, [delta[n.format(i=i)] for n in row.hf], layout, r)
                    assert torch.allclose(b @ a, want, rtol=0, atol=1e-12), (t, r, i)
    assert sorted(back) == sorted(peft)
    assert all(torch.equal(back[k], peft[k]) for k in peft)


@pytest.mark.parametrize("case", list(CASES))
def test_merge_equals_peft_merge_and_unload(base, tmp_path, case):
    """Imported (into the base's tp2-pp2 layout; "separate-all": into tp1-pp1, re-split for the base), merged per TP
    shard, gathered to HF weights and to a tp1-pp1 Megatron checkpoint: every tensor equals peft's merge_and_unload()."""
    model, peft_dir = _peft_dir(tmp_path, case)
    ours = str(tmp_path / "adapter")
    layout = Layout(TINY, 1, 1) if case == "separate-all" else base["layout"]
    convert.import_peft(peft_dir, ours, layout)
    to_huggingface(convert.LoraMergedReader(base["mg"], ours), str(tmp_path / "merged-hf"))
    to_megatron(convert.LoraMergedReader(base["mg"], ours), str(tmp_path / "merged-mg"), 1, 1)
    want = model.merge_and_unload().state_dict()
    got = load_file(str(tmp_path / "merged-hf" / "model.safetensors"))
    relaid = MegatronReader(str(tmp_path / "merged-mg"))
    assert sorted(got) == sorted(want)
    changed = 0
    for name in hf_names(TINY):
        assert torch.equal(got[name], want[name]), name
        assert torch.equal(relaid.get(name), want[name]), name
        changed += not torch.equal(want[name], tiny_llama().state_dict()[name]) if "layers.0." in name else 0
    assert changed == len(CASES[case]["target_modules"])  # the adapters did change the weights they target


def test_aquila2_qv_adapter_imports_block_structured(base, tmp_path):
    """q/v adapters with their own A's (rank 8, alpha 16) become one linear_qkv adapter of rank 16, alpha 32: same
    scaling, k's rows of B zero."""
    _, peft_dir = _peft_dir(tmp_path, "aquila2-qv")
    settings = convert.import_peft(peft_dir, str(tmp_path / "adapter"), base["layout"])
    assert settings == LoraSettings(("linear_qkv",), 8, 16.0, 0.05, (("linear_qkv", 16),))
    assert settings.alpha_of("linear_qkv") / settings.rank("linear_qkv") == 16 / 8
    full = AdapterCheckpoint(str(tmp_path / "adapter")).peft_tensors()
    src = load_file(os.path.join(peft_dir, "adapter_model.safetensors"))
    pre = "base_model.model.model.layers.1.self_attn."
    assert torch.equal(full[pre + "q_proj.lora_A.weight"], torch.cat([src[pre + "q_proj.lora_A.weight"],
                                                                      src[pre + "v_proj.lora_A.weight"]]))
    assert torch.equal(full[pre + "q_proj.lora_B.weight"][:, :8], src[pre + "q_proj.lora_B.weight"])
    assert not full[pre + "q_proj.lora_B.weight"][:, 8:].any() and not full[pre + "k_proj.lora_B.weight"].any()
    assert torch.equal(full[pre + "v_proj.lora_B.weight"][:, 8:], src[pre + "v_proj.lora_B.weight"])


@pytest.mark.parametrize("case", ["fused-all", "aquila2-qv"])
def test_export_loads_in_peft_and_imports_back_bit_for_bit(base, tmp_path, case):
    original, peft_dir = _peft_dir(tmp_path, case)
    ours = str(tmp_path / "adapter")
    convert.import_peft(peft_dir, ours, base["layout"])
    exported = convert.export_peft(ours, str(tmp_path / "export"), base_model_name_or_path=base["hf"])
    assert sorted(os.listdir(exported)) == ["adapter_config.json", "adapter_model.safetensors"]
    with open(os.path.join(exported, "adapter_config.json")) as f:
        cfg = json.load(f)
    modules = HF_MODULES if case == "fused-all" else ["k_proj", "q_proj", "v_proj"]
    assert sorted(cfg["target_modules"]) == sorted(modules) and cfg["peft_type"] == "LORA"
    assert (cfg["r"], cfg["lora_alpha"]) == ((4, 8) if case == "fused-all" else (8, 16))

    # peft loads it with no missing or unexpected adapter keys, and holds exactly the exported tensors
    loaded = PeftModel.from_pretrained(tiny_llama(), exported).eval()
    files = load_peft_weights(exported)
    probe = get_peft_model(tiny_llama(), LoraConfig.from_pretrained(exported))
    result = set_peft_model_state_dict(probe, files)
    assert result.unexpected_keys == [] and [k for k in result.missing_keys if "lora_" in k] == []
    held = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert len(held) == len(files)
    for k, v in files.items():
        assert torch.equal(held[k.replace(".weight", ".default.weight")], v), k

    # the exported adapter computes what the original did (block-structured case: the larger rank is exact)
    tokens = torch.randint(3, TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (loaded(tokens).logits - original(tokens).logits).abs().max() < 1e-5

    # and saved by peft, it imports back to the same checkpoint, bit for bit
    loaded.save_pretrained(tmp_path / "resaved")
    back = str(tmp_path / "back")
    convert.import_peft(str(tmp_path / "resaved"), back, base["layout"])
    a, b = AdapterCheckpoint(ours), AdapterCheckpoint(back)
    assert a.settings == b.settings
    for pp in range(2):
        for tp in range(2):
            sa, sb = a.rank_file(tp, pp)["model"], b.rank_file(tp, pp)["model"]
            assert sorted(sa) == sorted(sb) and all(".lora_" in k for k in sa)
            assert all(torch.equal(sa[k], sb[k]) and sa[k].dtype == torch.float32 for k in sa)


def test_bad_adapters_fail_clearly(base, tmp_path):
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        convert.import_peft(str(tmp_path), str(tmp_path / "x"), base["layout"])
    dora = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(CheckpointError, match="use_dora"):
        convert.import_peft(str(tmp_path / "dora"), str(tmp_path / "x"), base["layout"])
    head = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    head.save_pretrained(tmp_path / "head")
    with pytest.raises(CheckpointError, match="lm_head"):
        convert.import_peft(str(tmp_path / "head"), str(tmp_path / "x"), base["layout"])
    assert not os.path.exists(tmp_path / "x")  # nothing half-written
    with pytest.raises(CheckpointError, match="not a LoRA adapter"):
        convert.LoraMergedReader(base["mg"], base["mg"])


def _flags(**kw):
    d = dict(lora_target_modules=[], lora_r=None, lora_alpha=None, lora_dropout=None, lora_load=None)
    d.update(kw)
    return argparse.Namespace(**d)


def test_settings_follow_flags_and_the_saved_adapter():
    assert resolve(_flags()) is None
    s = resolve(_flags(lora_target_modules=["linear_fc2", "linear_qkv"]))
    assert (s.targets, s.r, s.alpha, s.scaling) == (("linear_qkv", "linear_fc2"), 16, 32.0, 2.0)  # MindSpeed's
    saved = LoraSettings(("linear_qkv",), 8, 16.0, 0.05, (("linear_qkv", 16),))
    assert resolve(_flags(lora_load="d"), saved) == saved
    assert resolve(_flags(lora_load="d", lora_r=8, lora_target_modules=["linear_qkv"]), saved) == saved
    with pytest.raises(UsageError, match=r"--lora-r 16 \(the adapter: 8\)"):
        resolve(_flags(lora_load="d", lora_r=16), saved)
    with pytest.raises(UsageError, match="--lora-target-modules"):
        resolve(_flags(lora_r=8))
    with pytest.raises(UsageError, match="choose one or more"):
        LoraSettings(("linear_qkv", "lm_head"))


def test_training_settings_need_a_base_and_an_existing_adapter(tmp_path):
    from aquila_npu.lora import training

    with pytest.raises(UsageError, match="LoRA needs --load"):
        training.settings(_flags(lora_target_modules=["linear_qkv"], load=None))
    with pytest.raises(CheckpointError, match="--lora-load .*: no adapter checkpoint there"):
        training.settings(_flags(lora_target_modules=["linear_qkv"], load="base", lora_load=str(tmp_path)))
    assert training.settings(_flags(load="base")) is None


def test_the_converter_command_imports_merges_and_exports(base, tmp_path, capsys):
    """The three LoRA conversions through tools/checkpoint/convert_ckpt.py's own flags (MindSpeed-LLM's): a PEFT
    adapter in (--loader peft --base-dir), merged into the base on the way to Hugging Face (--lora-load), out again
    as a PEFT adapter (--save-lora-to-hf); bad combinations are one-line errors."""
    from aquila_npu.cli.convert import main

    from helpers import call_main

    model, peft_dir = _peft_dir(tmp_path, "fused-all")
    adapter, merged, exported = (str(tmp_path / n) for n in ("adapter", "merged", "export"))
    common = ["--model-type", "GPT", "--saver", "megatron"]
    assert main([*common, "--loader", "peft", "--load-dir", peft_dir, "--base-dir", base["mg"],
                 "--save-dir", adapter]) == 0
    assert AdapterCheckpoint(adapter).layout == base["layout"]  # the base's tp2-pp2 by default
    assert main([*common, "--loader", "megatron", "--save-model-type", "save_huggingface_llama", "--load-dir",
                 base["mg"], "--lora-load", adapter, "--save-dir", merged]) == 0
    got = load_file(os.path.join(merged, "mg2hg", "model.safetensors"))
    want = model.merge_and_unload().state_dict()
    assert all(torch.equal(got[n], want[n]) for n in hf_names(TINY))
    assert main([*common, "--loader", "megatron", "--load-dir", base["mg"], "--lora-load", adapter,
                 "--save-lora-to-hf", "--save-dir", exported]) == 0
    assert sorted(os.listdir(exported)) == ["adapter_config.json", "adapter_model.safetensors"]
    exported_tensors = load_file(os.path.join(exported, "adapter_model.safetensors"))
    original = load_file(os.path.join(peft_dir, "adapter_model.safetensors"))
    assert sorted(exported_tensors) == sorted(original)
    assert all(torch.equal(exported_tensors[k], original[k]) for k in original)
    for args, needle in ((["--loader", "peft", "--load-dir", peft_dir, "--save-dir", tmp_path / "x"], "--base-dir"),
                         (["--loader", "hf", "--load-dir", base["hf"], "--lora-load", adapter, "--save-dir",
                           tmp_path / "y"], "--loader megatron"),
                         (["--loader", "megatron", "--load-dir", base["mg"], "--lora-load", adapter, "--lora-r", 8,
                           "--save-dir", tmp_path / "z"], "--lora-r 8 (the adapter: 4)")):
        rc, err = call_main(main, [*common, *args], capsys)
        assert rc == 2 and needle in err, err
    assert not any(os.path.exists(tmp_path / n) for n in "xyz")
