"""Loading a checkpoint never runs code (issue 18): a hostile checkpoint (a pickled object whose ``__reduce__`` makes
a marker directory when unpickled) is refused with one line naming the file by every entry point: pretrain (tp1;
tp2 with only rank 1's file hostile; a distributed-optimizer shard; a LoRA adapter in --lora-load), generate (tp1
and rank 1 of tp2), evaluate, selfcheck --load and its --hf-dir reference (pytorch_model.bin), convert Megatron -> HF,
Megatron -> Megatron, HF (pytorch_model.bin) -> Megatron, a PEFT adapter_model.bin imported (--loader peft), and a LoRA
adapter merged (--lora-load) or exported (--save-lora-to-hf). The payload never runs, while a plain
``torch.load(weights_only=False)`` of the same file does run it (the files are truly hostile)."""

import json
import os
import re
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT, build_assets, call_main, forked, forked_ranks

from aquila_npu.checkpoint import safe_load
from aquila_npu.cli.convert import main as convert_main
from aquila_npu.cli.evaluate import main as evaluate_main
from aquila_npu.cli.generate import main as generate_main
from aquila_npu.cli.pretrain import main as pretrain_main
from aquila_npu.cli.selfcheck import main as selfcheck_main


class Payload:
    """Unpickling this runs ``os.makedirs(marker)``: what a hostile checkpoint would do with os.system."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def _poison(path: Path, marker: Path) -> None:
    """Add the payload to a checkpoint file, keeping everything else."""
    obj = safe_load.load(str(path), mmap=False)
    if isinstance(obj, dict):
        obj["note"] = Payload(marker)
    else:
        obj = [*obj, Payload(marker)]
    torch.save(obj, path)


def _hostile_copy(src, dst: Path, marker: Path, rank_file="iter_0000001/mp_rank_00/model_optim_rng.pt") -> Path:
    shutil.copytree(src, dst)
    _poison(dst / rank_file, marker)
    return dst


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(str(tmp_path_factory.mktemp("hostile")), layouts=((1, 1), (2, 1)))


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "PAYLOAD-RAN"
    yield m
    assert not m.exists(), "the hostile checkpoint ran its code"


def test_the_payload_is_real(assets, tmp_path):
    """Control: an unrestricted torch.load of a poisoned file runs the payload (in a forked child)."""
    ran = tmp_path / "ran"
    bad = _hostile_copy(assets[1, 1], tmp_path / "mg", ran)
    path = bad / "iter_0000001/mp_rank_00/model_optim_rng.pt"
    assert forked(partial(torch.load, str(path), weights_only=False), tmp_path / "log") == 0
    assert ran.is_dir()


def _refused(err, path):
    assert re.search(rf"{re.escape(str(path))}: refused: it needs \S*makedirs", err), err[-2000:]


def test_pretrain_tp1(assets, tmp_path, capsys, marker):
    bad = _hostile_copy(assets[1, 1], tmp_path / "mg", marker)
    rc, err = call_main(pretrain_main, ["--load", bad, "--mock-data", "--tokenizer-name-or-path", assets["hf"],
                                        "--train-iters", 1, "--seq-length", 16], capsys)
    assert rc == 2
    _refused(err, bad / "iter_0000001/mp_rank_00/model_optim_rng.pt")


@pytest.mark.slow
def test_pretrain_tp2_rank1_file(assets, tmp_path, marker):
    """Only rank 1 reads the hostile file (after the process group exists): every rank ends with its line."""
    bad = _hostile_copy(assets[2, 1], tmp_path / "mg", marker, "iter_0000001/mp_rank_01/model_optim_rng.pt")
    argv = [str(a) for a in ["--load", bad, "--mock-data", "--tokenizer-name-or-path", assets["hf"], "--train-iters",
                             1, "--seq-length", 16, "--tensor-model-parallel-size", 2]]
    assert forked_ranks(partial(pretrain_main, argv), 2, tmp_path) == [2, 2]
    for r in range(2):
        _refused((tmp_path / f"rank{r}.log").read_text(), bad / "iter_0000001/mp_rank_01/model_optim_rng.pt")


@pytest.mark.slow
def test_pretrain_distributed_optimizer_shard(assets, tmp_path, marker):
    ck = tmp_path / "ck"
    base = ["--model", "aquila2-tiny", "--mock-data", "--seq-length", 16, "--use-distributed-optimizer"]
    argv = [str(a) for a in [*base, "--train-iters", 1, "--save", ck]]
    (tmp_path / "first").mkdir()
    assert forked_ranks(partial(pretrain_main, argv), 2, tmp_path / "first") == [0, 0]
    _poison(ck / "iter_0000001/mp_rank_00/distrib_optim_dp001.pt", marker)
    argv = [str(a) for a in [*base, "--train-iters", 2, "--load", ck]]
    assert forked_ranks(partial(pretrain_main, argv), 2, tmp_path) == [2, 2]
    _refused((tmp_path / "rank0.log").read_text(), ck / "iter_0000001/mp_rank_00/distrib_optim_dp001.pt")


def test_generate_tp1(assets, tmp_path, capsys, marker):
    bad = _hostile_copy(assets[1, 1], tmp_path / "mg", marker)
    rc, err = call_main(generate_main, ["--load", bad, "--tokenizer-name-or-path", assets["hf"], "--prompt", "hi",
                                        "--max-new-tokens", 2], capsys)
    assert rc == 2
    _refused(err, bad / "iter_0000001/mp_rank_00/model_optim_rng.pt")


@pytest.mark.slow
def test_generate_tp2_rank1_file(assets, tmp_path, marker):
    bad = _hostile_copy(assets[2, 1], tmp_path / "mg", marker, "iter_0000001/mp_rank_01/model_optim_rng.pt")
    argv = [str(a) for a in ["--load", bad, "--tokenizer-name-or-path", assets["hf"], "--prompt", "hi",
                             "--max-new-tokens", 2]]
    assert forked_ranks(partial(generate_main, argv), 2, tmp_path) == [2, 2]
    _refused((tmp_path / "rank0.log").read_text(), bad / "iter_0000001/mp_rank_01/model_optim_rng.pt")


def test_evaluate(assets, tmp_path, capsys, marker):
    bad = _hostile_copy(assets[1, 1], tmp_path / "mg", marker)
    data = tmp_path / "boolq.jsonl"
    data.write_text(json.dumps({"question": "is it", "title": "t", "answer": True, "passage": "it is."}) + "\n")
    rc, err = call_main(evaluate_main, ["--task", "boolq", "--task-data-path", data, "--load", bad,
                                        "--tokenizer-name-or-path", assets["hf"]], capsys)
    assert rc == 2
    _refused(err, bad / "iter_0000001/mp_rank_00/model_optim_rng.pt")


def test_selfcheck_load(assets, tmp_path, capsys, marker):
    bad = _hostile_copy(assets[1, 1], tmp_path / "mg", marker)
    rc, err = call_main(selfcheck_main, ["--load", bad, "--hf-dir", assets["hf"], "--device", "cpu"], capsys)
    assert rc == 2
    _refused(err, bad / "iter_0000001/mp_rank_00/model_optim_rng.pt")


@pytest.mark.parametrize("target", ["huggingface", "megatron"])
@pytest.mark.parametrize("rank", [0, 1])
def test_convert_from_megatron(assets, tmp_path, capsys, marker, target, rank):
    bad = _hostile_copy(assets[2, 1], tmp_path / "mg", marker, f"iter_0000001/mp_rank_{rank:02d}/model_optim_rng.pt")
    out = tmp_path / "out"
    save = ["--save-model-type", "save_huggingface_llama"] if target == "huggingface" else []
    rc, err = call_main(convert_main, ["--loader", "megatron", "--saver", "megatron", *save, "--load-dir", bad,
                                       "--save-dir", out], capsys)
    assert rc == 2
    _refused(err, bad / f"iter_0000001/mp_rank_{rank:02d}/model_optim_rng.pt")
    assert not out.exists() or not os.listdir(out)


def _hostile_hf_bin(source, hf, marker):
    """A copy of the HF folder ``source`` whose weights are a pytorch_model.bin that asks for ``Payload``."""
    shutil.copytree(source, hf)
    state = load_file(hf / "model.safetensors")
    os.remove(hf / "model.safetensors")
    state["note"] = Payload(marker)
    torch.save(state, hf / "pytorch_model.bin")
    return hf


def test_convert_from_huggingface_pytorch_bin(assets, tmp_path, capsys, marker):
    hf = _hostile_hf_bin(assets["hf"], tmp_path / "hf", marker)
    rc, err = call_main(convert_main, ["--loader", "llama2_hf", "--saver", "megatron", "--load-dir", hf,
                                       "--save-dir", tmp_path / "out"], capsys)
    assert rc == 2
    _refused(err, hf / "pytorch_model.bin")


def test_selfcheck_hf_dir_pytorch_bin(assets, tmp_path, capsys, marker):
    """The selfcheck's Hugging Face reference (``--hf-dir``): transformers' own refusal was a 30-line
    UnpicklingError; the pickle is read through safe_load first and refused in one line (issue 30)."""
    hf = _hostile_hf_bin(assets["hf"], tmp_path / "hf", marker)
    rc, err = call_main(selfcheck_main, ["--load", assets[1, 1], "--hf-dir", hf, "--device", "cpu"], capsys)
    assert rc == 2
    _refused(err, hf / "pytorch_model.bin")


def test_convert_peft_adapter_model_bin(assets, tmp_path, capsys, marker):
    """A Hugging Face PEFT adapter saved as ``adapter_model.bin`` (--loader peft): refused in one line (issue 30:
    five lines of torch's text), read through safe_load (peft's own loader would also try the Hub)."""
    from aquila_npu.testing.tiny_hf import tiny_peft

    peft_dir = tmp_path / "peft"
    tiny_peft(["q_proj", "v_proj"]).save_pretrained(peft_dir, safe_serialization=False)
    assert (peft_dir / "adapter_model.bin").exists() and not (peft_dir / "adapter_model.safetensors").exists()
    _poison(peft_dir / "adapter_model.bin", marker)
    rc, err = call_main(convert_main, ["--loader", "peft", "--saver", "megatron", "--load-dir", peft_dir, "--base-dir",
                                       assets[1, 1], "--save-dir", tmp_path / "out"], capsys)
    assert rc == 2
    _refused(err, peft_dir / "adapter_model.bin")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def adapter(assets, tmp_path_factory):
    """A LoRA adapter checkpoint trained for one iteration on the tp1 base (adapters, optimizer, RNG)."""
    d = tmp_path_factory.mktemp("adapter")
    argv = [str(a) for a in ["--load", assets[1, 1], "--mock-data", "--tokenizer-name-or-path", assets["hf"],
                             "--train-iters", 1, "--seq-length", 16, "--lora-target-modules", "linear_qkv",
                             "--lora-r", 4, "--save", d / "adapter"]]
    assert forked(partial(pretrain_main, argv), d / "log") == 0, (d / "log").read_text()[-3000:]
    return d / "adapter"


def test_pretrain_lora_load(assets, adapter, tmp_path, capsys, marker):
    bad = _hostile_copy(adapter, tmp_path / "adapter", marker)
    rc, err = call_main(pretrain_main, ["--load", assets[1, 1], "--lora-load", bad, "--mock-data",
                                        "--tokenizer-name-or-path", assets["hf"], "--train-iters", 2, "--seq-length",
                                        16], capsys)
    assert rc == 2
    _refused(err, bad / "iter_0000001/mp_rank_00/model_optim_rng.pt")


@pytest.mark.parametrize("export", [False, True], ids=["merge", "export-peft"])
def test_convert_lora_load(assets, adapter, tmp_path, capsys, marker, export):
    bad = _hostile_copy(adapter, tmp_path / "adapter", marker)
    rc, err = call_main(convert_main, ["--loader", "megatron", "--saver", "megatron", "--load-dir", assets[1, 1],
                                       "--lora-load", bad, *(["--save-lora-to-hf"] if export else []),
                                       "--save-dir", tmp_path / "out"], capsys)
    assert rc == 2
    _refused(err, bad / "iter_0000001/mp_rank_00/model_optim_rng.pt")


def test_what_we_write_needs_nothing_beyond_the_allow_list(assets):
    """Converted checkpoints need only argparse.Namespace besides what weights_only allows (training checkpoints,
    with optimizer, scheduler and RNG states, are read back through safe_load by the resume tests)."""
    for path in Path(assets[2, 1]).rglob("*.pt"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == ["argparse.Namespace"]


def test_no_code_path_reads_a_checkpoint_without_the_allow_list():
    """Every torch.load in the package is safe_load's (weights_only=True); a new one elsewhere fails here."""
    offenders = []
    for path in (ROOT / "aquila_npu").rglob("*.py"):
        text = path.read_text()
        if "weights_only=False" in text or ("torch.load(" in text and path.name != "safe_load.py"):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
