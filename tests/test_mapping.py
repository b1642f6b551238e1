"""The weight-mapping table: HF -> megatron-core shards -> HF is exact for every tp/pp; shapes match Megatron's."""

import pytest
import torch

from aquila_npu.models.registry import get_model_spec
from aquila_npu.testing.tiny_hf import TINY, tiny_llama
from aquila_npu.errors import LayoutError
from aquila_npu.weights.mapping import (Layout, TABLE, hf_names, hf_stage_to_mcore, mcore_stage_to_hf,
                                        split_for_tp)


@pytest.fixture(scope="module")
def hf_state():
    return tiny_llama().state_dict()


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("pp", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_roundtrip_exact(hf_state, tp, pp, dtype):
    state = {k: v.to(dtype) for k, v in hf_state.items()}
    layout = Layout(TINY, tp, pp, make_vocab_size_divisible_by=8)
    back = {}
    for stage in range(pp):
        shards = hf_stage_to_mcore(state.__getitem__, layout, stage)
        for sd in shards:
            for k, v in sd.items():
                assert v.dtype == dtype
                if "word_embeddings" in k or "output_layer" in k:
                    assert v.shape[0] == layout.padded_vocab // tp
        back.update(mcore_stage_to_hf(shards, layout, stage))
    assert sorted(back) == sorted(hf_names(TINY)) == sorted(state)
    for k in state:
        assert torch.equal(back[k], state[k]), k


def test_vocab_padding():
    assert Layout(TINY, 1, 1, 8).padded_vocab == 1008
    assert Layout(TINY, 2, 1, 8).padded_vocab == 1008
    assert Layout(TINY, 2, 1, 128).padded_vocab == 1024
    assert Layout(get_model_spec("aquila2-7b"), 8, 1, 1).padded_vocab == 100008


def test_qkv_is_packed_per_query_group(hf_state):
    """Rows of group g are [its q heads | k_g | v_g] (what megatron-core's get_query_key_value_tensors reads)."""
    layout = Layout(TINY, 2, 1)
    q, k, v = (hf_state[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "qkv")
    row = next(r for r in TABLE if r.kind == "qkv")
    shards = split_for_tp(row, [q, k, v], layout)
    d, per = TINY.head_dim, TINY.num_attention_heads // TINY.num_key_value_heads
    ng_rank = TINY.num_key_value_heads // 2  # groups per TP rank
    g0 = shards[0]  # rank 0 starts with group 0
    assert torch.equal(g0[: per * d], q[: per * d])
    assert torch.equal(g0[per * d: per * d + d], k[:d])
    assert torch.equal(g0[per * d + d: (per + 2) * d], v[:d])
    assert torch.equal(g0[(per + 2) * d: (per + 2) * d + per * d], q[per * d: 2 * per * d])  # group 1 follows
    assert torch.equal(shards[1][: per * d], q[ng_rank * per * d: (ng_rank + 1) * per * d])  # rank 1: group ng_rank


def test_modellink_tp8_shapes_for_7b():
    """Per-rank shapes of Aquila2-7B at TP8 (ModelLink's test): qkv [1536, 4096], dense [4096, 512],
    fc1 [2752, 4096], fc2 [4096, 1376], embeddings/output [12501, 4096]."""
    spec = get_model_spec("aquila2-7b")
    layout = Layout(spec, 8, 1)
    meta = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
    h, f, v = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    hf = {"qkv": [meta(h, h), meta(h, h), meta(h, h)], "row": [meta(h, h)], "swiglu": [meta(f, h), meta(f, h)],
          "vocab": [meta(v, h)]}
    shapes = {r.mcore: tuple(split_for_tp(r, hf[r.kind], layout)[0].shape) for r in TABLE if r.kind in hf}
    assert shapes["decoder.layers.{i}.self_attention.linear_qkv.weight"] == (1536, 4096)
    assert shapes["decoder.layers.{i}.self_attention.linear_proj.weight"] == (4096, 512)
    assert shapes["decoder.layers.{i}.mlp.linear_fc1.weight"] == (2752, 4096)
    assert shapes["embedding.word_embeddings.weight"] == (12501, 4096)
    assert shapes["output_layer.weight"] == (12501, 4096)
    row_fc2 = next(r for r in TABLE if r.mcore.endswith("linear_fc2.weight"))
    assert tuple(split_for_tp(row_fc2, [meta(h, f)], layout)[0].shape) == (4096, 1376)


def test_34b_layouts():
    spec = get_model_spec("aquila2-34b")
    assert Layout(spec, 8, 2).stage_layers(1) == range(30, 60)
    with pytest.raises(LayoutError, match="query groups"):
        Layout(spec, 16, 1)
    with pytest.raises(LayoutError, match="layers"):
        Layout(spec, 8, 7)
    with pytest.raises(LayoutError, match="heads"):
        Layout(TINY, 3, 1)


def test_missing_shard_is_named(hf_state):
    layout = Layout(TINY, 2, 1)
    shards = hf_stage_to_mcore(hf_state.__getitem__, layout, 0)
    del shards[1]["decoder.layers.2.mlp.linear_fc2.weight"]
    with pytest.raises(KeyError, match="linear_fc2.*rank"):
        dict(mcore_stage_to_hf(shards, layout, 0))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_lazy_safetensors_slices_give_the_same_shards(hf_state, tmp_path, tp):
    """The converter reads safetensors slice by slice (only each rank's rows/columns); the shards equal those built
    from whole tensors (which the round-trip test checks against the independent merge)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from aquila_npu.weights.mapping import hf_rank_to_mcore

    save_file({k: v.contiguous() for k, v in hf_state.items()}, tmp_path / "m.safetensors")
    f = safe_open(tmp_path / "m.safetensors", framework="pt")
    layout = Layout(TINY, tp, 2, make_vocab_size_divisible_by=16)
    for stage in range(2):
        whole = hf_stage_to_mcore(hf_state.__getitem__, layout, stage)
        for r in range(tp):
            part = hf_rank_to_mcore(f.get_slice, layout, stage, r)
            assert part.keys() == whole[r].keys()
            for k in part:
                assert torch.equal(part[k], whole[r][k]), (k, r)


def test_vocab_larger_than_padded_is_an_error(hf_state):
    layout = Layout(TINY.replace(vocab_size=1000), 2, 1, make_vocab_size_divisible_by=8)  # padded vocab 1008
    big = torch.zeros(2000, TINY.hidden_size)
    row = next(r for r in TABLE if r.kind == "vocab")
    with pytest.raises(LayoutError, match="padded vocab"):
        split_for_tp(row, [big], layout)
