"""tools/checkpoint/convert_ckpt.py: HF <-> Megatron at any tp/pp, bit for bit; clear errors, no partial output."""

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from aquila_npu.checkpoint import safe_load
from aquila_npu.cli.convert import main
from aquila_npu.testing.tiny_hf import tiny_llama
from helpers import ROOT, assert_one_line_error, child_env


def _hf_state(path):
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    out = {}
    for f in files:
        out.update(load_file(os.path.join(path, f)))
    return out


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def hf_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    tiny_llama(dtype=request.param).save_pretrained(d, max_shard_size="100KB")  # sharded, with index
    (d / "tokenizer_config.json").write_text("{}")
    return d


def _convert(*args):
    """The converter in this process; an input error (exit status 2) must be one line on stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main([*map(str, args)])
    sys.stderr.write(err.getvalue())  # still there for tests that read it
    if rc == 2:
        assert_one_line_error(err.getvalue())
    return rc


def _to_mg(src, dst, tp, pp, loader="llama2_hf"):
    assert _convert("--model-type", "GPT", "--loader", loader, "--saver", "megatron", "--load-dir", src,
                    "--save-dir", dst, "--target-tensor-parallel-size", tp, "--target-pipeline-parallel-size", pp) == 0


def _to_hf(src, dst):
    assert _convert("--model-type", "GPT", "--loader", "megatron", "--saver", "megatron", "--save-model-type",
                    "save_huggingface_llama", "--load-dir", src, "--save-dir", dst) == 0
    return dst / "mg2hg"


def _assert_same(a, b):
    sa, sb = _hf_state(a), _hf_state(b)
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_hf_tp2pp2_hf_bit_exact(hf_dir, tmp_path):
    _to_mg(hf_dir, tmp_path / "mg", 2, 2)
    files = sorted(str(p.relative_to(tmp_path / "mg")) for p in (tmp_path / "mg").rglob("*.pt"))
    assert files == [f"iter_0000001/mp_rank_{t:02d}_{p:03d}/model_optim_rng.pt" for t in range(2) for p in range(2)]
    assert (tmp_path / "mg" / "latest_checkpointed_iteration.txt").read_text() == "1"
    hf_back = tmp_path / "hfsave"
    hf_back.mkdir()
    for f in ("config.json", "tokenizer_config.json"):  # the original HF folder, as users pass it
        (hf_back / f).write_text((hf_dir / f).read_text())
    out = _to_hf(tmp_path / "mg", hf_back)
    _assert_same(hf_dir, out)
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 4
    assert (out / "tokenizer_config.json").exists()


def test_tp1_to_tp4_megatron_relayout(hf_dir, tmp_path):
    _to_mg(hf_dir, tmp_path / "tp1", 1, 1)
    _to_mg(tmp_path / "tp1", tmp_path / "tp4", 4, 1, loader="megatron")
    _to_mg(hf_dir, tmp_path / "tp4-direct", 4, 1)
    for r in range(4):
        a = safe_load.load(str(tmp_path / f"tp4/iter_0000001/mp_rank_{r:02d}/model_optim_rng.pt"))
        b = safe_load.load(str(tmp_path / f"tp4-direct/iter_0000001/mp_rank_{r:02d}/model_optim_rng.pt"))
        assert a["model"].keys() == b["model"].keys()
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        assert a["aquila"]["tp"] == 4


def test_bad_inputs_leave_no_output(hf_dir, tmp_path, capsys):
    dst = tmp_path / "out"
    assert _convert("--loader", "llama2_hf", "--saver", "megatron", "--load-dir", hf_dir, "--save-dir", dst,
                    "--target-tensor-parallel-size", 3) == 2
    assert "tensor parallel size 3" in capsys.readouterr().err
    assert _convert("--loader", "llama2_hf", "--saver", "megatron", "--load-dir", hf_dir, "--save-dir", dst,
                    "--target-pipeline-parallel-size", 3) == 2
    assert _convert("--loader", "llama2_hf", "--saver", "megatron", "--load-dir", tmp_path / "nope",
                    "--save-dir", dst) == 2
    assert not dst.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no tmp, no lock


def test_help_lists_every_flag():
    out = subprocess.run([sys.executable, str(ROOT / "tools/checkpoint/convert_ckpt.py"), "--help"],
                         env=child_env(), capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--model-type", "--loader", "--saver", "--save-model-type", "--load-dir", "--save-dir",
                 "--target-tensor-parallel-size", "--target-pipeline-parallel-size", "--tokenizer-model",
                 "--params-dtype", "--make-vocab-size-divisible-by"):
        assert flag in out.stdout


@pytest.mark.slow
def test_converted_tp2_pp2_checkpoint_matches_hf_logits_on_four_processes(tmp_path):
    from helpers import read_json, torchrun

    hf = tmp_path / "hf"
    tiny_llama().save_pretrained(hf)
    _to_mg(hf, tmp_path / "mg", 2, 2)
    torchrun("-m aquila_npu.selfcheck", 4, ["--tp", 2, "--pp", 2, "--load", tmp_path / "mg", "--hf-dir", hf,
                                            "--out", tmp_path / "r.json"])
    r = read_json(tmp_path / "r.json")
    assert r["max_abs_diff"] < 1e-4 and r["argmax_agree"] == 1.0


def test_max_shard_size_splits_hf_output(hf_dir, tmp_path):
    _to_mg(hf_dir, tmp_path / "mg", 1, 1)
    dst = tmp_path / "hfsave"
    assert _convert("--loader", "megatron", "--saver", "megatron", "--save-model-type", "save_huggingface_llama",
                    "--load-dir", tmp_path / "mg", "--save-dir", dst, "--max-shard-size-gb", 0.0002) == 0
    index = json.loads((dst / "mg2hg" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _assert_same(hf_dir, dst / "mg2hg")


def test_mg2hg_output_loads_in_transformers_with_same_logits(tmp_path):
    """The streamed safetensors writer's files are read by transformers itself (single file and sharded)."""
    from transformers import AutoModelForCausalLM

    hf = tmp_path / "hf"
    tiny_llama().save_pretrained(hf)
    ref = AutoModelForCausalLM.from_pretrained(hf).eval()  # same attention implementation as the reloaded one
    _to_mg(hf, tmp_path / "mg", 2, 2)
    for shard_gb in (5, 0.0002):
        dst = tmp_path / f"back-{shard_gb}"
        assert _convert("--loader", "megatron", "--saver", "megatron", "--save-model-type", "save_huggingface_llama",
                        "--load-dir", tmp_path / "mg", "--save-dir", dst, "--max-shard-size-gb", shard_gb) == 0
        back = AutoModelForCausalLM.from_pretrained(dst / "mg2hg").eval()
        tokens = torch.randint(3, 1003, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(back(tokens).logits, ref(tokens).logits)


def test_params_dtype_casts_each_tensor(tmp_path):
    hf = tmp_path / "hf"
    tiny_llama().save_pretrained(hf)  # fp32
    assert _convert("--loader", "llama2_hf", "--saver", "megatron", "--load-dir", hf, "--save-dir", tmp_path / "mg",
                    "--target-tensor-parallel-size", 2, "--params-dtype", "bf16") == 0
    ck = safe_load.load(str(tmp_path / "mg/iter_0000001/mp_rank_00/model_optim_rng.pt"))
    assert ck["aquila"]["params_dtype"] == "bfloat16" and ck["args"].bf16
    assert all(t.dtype == torch.bfloat16 for t in ck["model"].values())
    out = _to_hf(tmp_path / "mg", tmp_path / "back")
    state, ref = _hf_state(out), _hf_state(hf)
    for k in ref:  # Megatron -> HF keeps the checkpoint's bf16; each tensor is HF's own cast
        assert state[k].dtype == torch.bfloat16 and torch.equal(state[k], ref[k].to(torch.bfloat16)), k
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert _convert("--loader", "megatron", "--saver", "megatron", "--save-model-type", "save_huggingface_llama",
                    "--load-dir", tmp_path / "mg", "--save-dir", tmp_path / "back32", "--params-dtype", "fp32") == 0
    state32 = _hf_state(tmp_path / "back32" / "mg2hg")
    assert all(state32[k].dtype == torch.float32 and torch.equal(state32[k], ref[k].to(torch.bfloat16).float())
               for k in ref)


def _no_output(tmp_path, dst):
    return not dst.exists() and not [p for p in dst.parent.iterdir() if p.name.startswith(".tmp")]


@pytest.mark.parametrize("damage", ["truncated", "bad-header", "header-length"])
def test_corrupt_safetensors_is_a_clear_error(tmp_path, capsys, damage):
    hf = tmp_path / "hf"
    tiny_llama().save_pretrained(hf)
    f = hf / "model.safetensors"
    data = f.read_bytes()
    if damage == "truncated":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "bad-header":
        f.write_bytes(data[:8] + b"{not json" + data[17:])
    else:
        f.write_bytes((10 ** 12).to_bytes(8, "little") + data[8:])
    dst = tmp_path / "out" / "mg"
    (tmp_path / "out").mkdir()
    assert _convert("--loader", "llama2_hf", "--saver", "megatron", "--load-dir", hf, "--save-dir", dst) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and ("truncated" in err or "corrupt" in err), err
    assert _no_output(tmp_path, dst)


def test_save_dir_holding_another_checkpoint_is_refused(tmp_path, capsys):
    from aquila_npu.testing.tiny_hf import TINY

    hf, other = tmp_path / "hf", tmp_path / "other"
    tiny_llama().save_pretrained(hf)
    tiny_llama(TINY.replace(num_layers=2)).save_pretrained(other)
    dst = tmp_path / "mg"
    _to_mg(other, dst, 1, 1)
    before = sorted(p.name for p in dst.rglob("*"))
    assert _convert("--loader", "llama2_hf", "--saver", "megatron", "--load-dir", hf, "--save-dir", dst) == 2
    assert "different model" in capsys.readouterr().err
    assert sorted(p.name for p in dst.rglob("*")) == before  # untouched
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    assert _convert("--loader", "llama2_hf", "--saver", "megatron", "--load-dir", hf, "--save-dir", junk) == 2
    assert "not empty" in capsys.readouterr().err and (junk / "notes.txt").read_text() == "mine"
    _to_mg(hf, tmp_path / "same", 1, 1)  # the same model at another layout may replace its own output
    _to_mg(hf, tmp_path / "same", 2, 1)
    assert (tmp_path / "same/iter_0000001/mp_rank_01/model_optim_rng.pt").exists()
    assert not (tmp_path / "same/iter_0000001/mp_rank_00_000").exists()


def test_tokenizer_larger_than_model_vocab_is_refused(tmp_path, capsys):
    from tokenizers import Tokenizer, models

    hf = tmp_path / "hf"
    tiny_llama().save_pretrained(hf)  # vocab 1003
    for n, ok in ((1003, True), (1004, False)):
        tok = tmp_path / f"tok{n}.json"
        Tokenizer(models.WordLevel({f"w{i}": i for i in range(n)}, unk_token="w0")).save(str(tok))
        rc = _convert("--loader", "llama2_hf", "--saver", "megatron", "--load-dir", hf, "--save-dir",
                      tmp_path / f"mg{n}", "--tokenizer-model", tok)
        assert rc == (0 if ok else 2)
    assert "1004 tokens, more than the model's vocab 1003" in capsys.readouterr().err
    assert _no_output(tmp_path, tmp_path / "mg1004")
    assert _convert("--loader", "llama2_hf", "--saver", "megatron", "--load-dir", hf, "--save-dir", tmp_path / "x",
                    "--tokenizer-model", tmp_path / "missing.json") == 2
    assert "--tokenizer-model" in capsys.readouterr().err
