"""FlagAI's first-generation Aquila (seed 001: Aquila-7B, AquilaChat-7B, AquilaCode-7B-*) in FlagAI's own layout,
through the converter and the commands (issue 24).

A FlagAI model folder made by FlagAI's own code (``AQUILAModel.init_from_json`` from FlagAI's config.json keys,
its state dict saved as ``pytorch_model.bin``, as ``AutoLoader`` reads it; the trainer's ``latest_iteration.txt`` +
``<iteration>/`` with ``{"module": ...}``) converts into any tp/pp and back to Hugging Face bit for bit; the Hugging
Face folder, run by BAAI's ``AquilaForCausalLM`` and by transformers' ``LlamaForCausalLM``, gives FlagAI's own
``AQUILAModel`` logits on the original weights; a wrong key or shape is one line naming it (exit 2, nothing written);
FlagAI's 100k BPE loads from the folder's vocab.json + merges.txt without remote code, as FlagAI's tokenizer and
BAAI's Hugging Face tokenizer files encode; ``generate`` from the converted checkpoint and FlagAI's tokenizer folder
continues a prompt as FlagAI's own greedy decoding does.
"""

import functools
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import (ROOT, aquila1_model, assert_one_line_error, call_main, child_env, flagai, flagai_readable,
                     flagai_root, forked, stub_torchrun_argv)

from aquila_npu.cli.convert import main as convert_main
from aquila_npu.models.flagai_config import ffn_size
from aquila_npu.models.registry import MODELS

SPEC = MODELS["aquila-7b"].replace(hidden_size=32, intermediate_size=ffn_size(32, 8), num_layers=4,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)


def _hf_state(path):
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def _convert(capsys, *args):
    return call_main(convert_main, ["--model-type", "GPT", *args], capsys)


def _to_mg(capsys, src, dst, tp, pp):
    rc, err = _convert(capsys, "--loader", "llama2_hf", "--saver", "megatron", "--load-dir", src, "--save-dir", dst,
                       "--target-tensor-parallel-size", tp, "--target-pipeline-parallel-size", pp)
    assert rc == 0, err


def _to_hf(capsys, src, dst):
    rc, err = _convert(capsys, "--loader", "megatron", "--saver", "megatron", "--save-model-type",
                       "save_huggingface_llama", "--load-dir", src, "--save-dir", dst)
    assert rc == 0, err
    return dst / "mg2hg"


@pytest.fixture(scope="module")
def flagai_folder(tmp_path_factory):
    """``<dir>/aquila-7b``: FlagAI's config.json + pytorch_model.bin (+ the tokenizer's vocab.json / merges.txt
    when the real data is there), and FlagAI's model itself (the reference)."""
    d = tmp_path_factory.mktemp("flagai") / "aquila-7b"
    model = aquila1_model(SPEC, str(d), seed=3)
    return d, model


def test_flagai_to_any_layout_and_back_is_bit_for_bit_and_runs_as_flagai(flagai_folder, tmp_path, capsys):
    folder, model = flagai_folder
    _to_mg(capsys, folder, tmp_path / "tp2pp2", 2, 2)
    first = _to_hf(capsys, tmp_path / "tp2pp2", tmp_path / "hf1")
    _to_mg(capsys, folder, tmp_path / "tp1pp1", 1, 1)
    second = _to_hf(capsys, tmp_path / "tp1pp1", tmp_path / "hf2")
    _to_mg(capsys, first, tmp_path / "tp4pp1", 4, 1)  # the HF folder in again, another layout
    third = _to_hf(capsys, tmp_path / "tp4pp1", tmp_path / "hf3")
    a, b, c = _hf_state(first), _hf_state(second), _hf_state(third)
    assert sorted(a) == sorted(b) == sorted(c)
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    cfg = json.loads((first / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == SPEC.num_layers
    # the Hugging Face folder under BAAI's AquilaForCausalLM and transformers' LlamaForCausalLM = FlagAI's AQUILAModel
    tokens = torch.randint(0, SPEC.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=tokens, labels=tokens)["logits"]
        configuration = flagai("model.aquila2.configuration_aquila")
        modeling = flagai("model.aquila2.modeling_aquila")
        baai = modeling.AquilaForCausalLM(flagai_readable(configuration.AquilaConfig(
            **{k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")}), SPEC))
        baai.load_state_dict(a)
        from transformers import LlamaForCausalLM

        llama = LlamaForCausalLM.from_pretrained(first).eval()
        for other in (baai.float().eval()(input_ids=tokens, return_dict=True).logits, llama(tokens).logits):
            assert (other - ref).abs().max().item() < 1e-4 * max(ref.abs().max().item(), 1.0)


def test_fp16_flagai_weights_come_back_bit_for_bit(flagai_folder, tmp_path, capsys):
    """FlagAI's released checkpoints are fp16: FlagAI folder -> tp2-pp2 -> Hugging Face holds every FlagAI tensor
    unchanged (fp16, the same bits), the query / key rows of each head moved from FlagAI's interleaved RoPE pairs
    (rows 2j, 2j + 1) to rotate-half order (rows j, j + d/2), nothing else."""
    from aquila_npu.weights.flagai import flagai_key
    from aquila_npu.weights.mapping import hf_names

    folder, _ = flagai_folder
    half = tmp_path / "aquila-7b"
    half.mkdir()
    shutil.copy(folder / "config.json", half / "config.json")
    state = {k: v.half() for k, v in torch.load(folder / "pytorch_model.bin", weights_only=True).items()}
    torch.save(state, half / "pytorch_model.bin")
    _to_mg(capsys, half, tmp_path / "mg", 2, 2)
    back = _hf_state(_to_hf(capsys, tmp_path / "mg", tmp_path / "hf"))
    assert sorted(back) == sorted(hf_names(SPEC))
    d = SPEC.hidden_size // SPEC.num_attention_heads
    order = [h * d + 2 * j + k for h in range(SPEC.num_attention_heads) for k in (0, 1) for j in range(d // 2)]
    for name, tensor in back.items():
        theirs = state[flagai_key(name)]
        if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            theirs = theirs[order]
        assert tensor.dtype == torch.float16 and torch.equal(tensor.view(torch.int16), theirs.view(torch.int16)), \
            name


def test_flagai_trainer_layout_converts_alike(flagai_folder, tmp_path, capsys):
    """FlagAI's trainer: latest_iteration.txt names <save_dir>/<iteration>/, whose pytorch_model.bin holds
    {"module": state dict, ...}."""
    folder, _ = flagai_folder
    save = tmp_path / "aquila-7b"
    (save / "12").mkdir(parents=True)
    shutil.copy(folder / "config.json", save / "12" / "config.json")
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save({"iteration_in_epoch": 0, "module": state}, save / "12" / "pytorch_model.bin")
    (save / "latest_iteration.txt").write_text("12\t12")
    _to_mg(capsys, save, tmp_path / "a", 1, 1)
    _to_mg(capsys, folder, tmp_path / "b", 1, 1)
    a, b = _hf_state(_to_hf(capsys, tmp_path / "a", tmp_path / "ha")), _hf_state(_to_hf(capsys, tmp_path / "b",
                                                                                          tmp_path / "hb"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("change,named", [
    ("rename", "'layers.1.attention.wq.weight.bak' is not a key of FlagAI's Aquila model"),
    ("shape", "layers.1.feed_forward.w2.weight has shape (32, 80), the model of"),
    ("drop", "FlagAI key 'layers.3.ffn_norm.weight' is missing"),
])
def test_a_wrong_key_or_shape_is_one_line_naming_it(flagai_folder, tmp_path, capsys, change, named):
    folder, _ = flagai_folder
    bad = tmp_path / "aquila-7b"
    bad.mkdir()
    shutil.copy(folder / "config.json", bad / "config.json")
    state = dict(torch.load(folder / "pytorch_model.bin", weights_only=True))
    if change == "rename":
        state["layers.1.attention.wq.weight.bak"] = state.pop("layers.1.attention.wq.weight")
    elif change == "shape":
        state["layers.1.feed_forward.w2.weight"] = state["layers.1.feed_forward.w2.weight"][:, :80].clone()
    else:
        del state["layers.3.ffn_norm.weight"]
    torch.save(state, bad / "pytorch_model.bin")
    rc, err = _convert(capsys, "--loader", "llama2_hf", "--saver", "megatron", "--load-dir", bad, "--save-dir",
                       tmp_path / "out")
    assert rc == 2 and named in err, err
    assert_one_line_error(err)
    assert not (tmp_path / "out").exists() and sorted(os.listdir(tmp_path)) == ["aquila-7b"]


def test_the_registry_entries_are_flagais_names_and_config():
    """FlagAI's AutoLoader names (its MODEL_DICT) for every first-generation entry, the chat model's template
    FlagAI's default (its conversation.py's aquila-chat, from Aquila-chat/cyg_conversation.py)."""
    auto_loader_src = os.path.join(os.path.dirname(flagai("model.aquila_model").__file__), "..", "auto_model",
                                   "auto_loader.py")
    text = open(auto_loader_src, encoding="utf-8").read()
    first = sorted(n for n, s in MODELS.items() if s.generation == 1)
    assert first == ["aquila-7b", "aquilachat-7b", "aquilacode-7b-nv", "aquilacode-7b-ts"]
    for name in first:
        assert f'"{name}": ["flagai.model.aquila_model", "AQUILAModel"' in text, name
    assert MODELS["aquilachat-7b"].chat_template == "aquila-chat"


# ------------------------------------------------------------------ the tokenizer: FlagAI's 100k BPE, no remote code
@pytest.fixture(scope="module")
def tokenizer_folder(flagai_folder, shared_data_dir):
    """A FlagAI model folder's tokenizer files: vocab.json + merges.txt (FlagAI's gpt2_new_100k), no HF config."""
    folder, _ = flagai_folder
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(shared_data_dir / "aquila2-tokenizer" / f, folder / f)
    return folder


@pytest.fixture(scope="module")
def shared_data_dir():
    from helpers import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not present: {SHARED_DATA} (a user's clone has no ../shared)")
    return SHARED_DATA


def _texts(shared):
    rows = json.loads((shared / "alpaca" / "alpaca_5000.json").read_text())[:200]
    return [r["instruction"] + "\n" + r["input"] + "\n" + r["output"] for r in rows] + [
        "北京在哪儿?", "#补全代码\ndef quick_sort(x):", "<|startofpiece|>你好<|endofpiece|></s>[CLS]"]


def test_flagai_tokenizer_loads_without_remote_code_and_encodes_as_baai(tokenizer_folder, shared_data_dir):
    from transformers import AutoTokenizer

    from aquila_npu.data.tokenizer import load_tokenizer, vocab_size

    ours = load_tokenizer(str(tokenizer_folder))
    baai = AutoTokenizer.from_pretrained(shared_data_dir / "aquila2-tokenizer")  # BAAI's Hugging Face files
    assert vocab_size(ours) == vocab_size(baai) == SPEC.vocab_size
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (100006, 100007, 0)
    for text in _texts(shared_data_dir):
        assert ours.encode(text) == baai.encode(text), text[:60]
        assert ours.decode(ours.encode(text)) == text


def test_flagai_tokenizer_encodes_as_flagais_own(tokenizer_folder, shared_data_dir, monkeypatch):
    """FlagAI's Tokenizer (its BPE of vocab.json + merges.txt) on plain text. Its module imports ``ftfy`` for the
    multimodal tokenizer's text cleaning, which ``BPETokenizer`` never calls: an empty stand-in where ftfy is not
    installed."""
    import importlib.util
    import sys
    import types

    if importlib.util.find_spec("ftfy") is None:
        monkeypatch.setitem(sys.modules, "ftfy", types.ModuleType("ftfy"))
    try:
        tokenizer = flagai("data.tokenizer.uni_tokenizer.bpe_tokenizer")
    except ImportError as e:
        pytest.skip(f"FlagAI's tokenizer does not import here: {e}")
    theirs = tokenizer.BPETokenizer(str(tokenizer_folder / "vocab.json"), str(tokenizer_folder / "merges.txt"))
    from aquila_npu.data.tokenizer import load_tokenizer

    ours = load_tokenizer(str(tokenizer_folder))
    for text in _texts(shared_data_dir)[:-1]:
        assert ours.encode(text) == theirs.convert_tokens_to_ids(theirs.tokenize(text)), text[:60]


def test_generate_from_flagai_weights_and_tokenizer_is_flagais_greedy(tokenizer_folder, tmp_path, capsys):
    """convert (FlagAI folder -> tp1) then ``generate --greedy`` with the FlagAI folder as the tokenizer: the tokens
    FlagAI's own decoding (predictor/aquila.aquila_generate at temperature 0, its KV cache) chooses."""
    from aquila_npu.cli.generate import main as generate_main

    folder = tokenizer_folder
    model = aquila1_model(SPEC, str(tmp_path / "aquila-7b"), seed=3, batch=1)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(folder / f, tmp_path / "aquila-7b" / f)
    _to_mg(capsys, tmp_path / "aquila-7b", tmp_path / "mg", 1, 1)
    from aquila_npu.data.tokenizer import load_tokenizer

    prompt = "北京在哪儿?"
    ids = load_tokenizer(str(folder)).encode(prompt)
    seq, prev = list(ids), 0
    with torch.no_grad():
        for cur in range(len(ids), len(ids) + 8):
            seq.append(int(model(input_ids=torch.tensor([seq[prev:cur]]), start_pos=prev)["logits"].argmax(-1)))
            prev = cur
    out = tmp_path / "gen.jsonl"
    rc = forked(functools.partial(generate_main, ["--load", str(tmp_path / "mg"), "--tokenizer-name-or-path",
                                                  str(folder), "--prompt", prompt, "--greedy", "--max-new-tokens",
                                                  "8", "--eos-token-id", "-1", "--output", str(out)]),
                tmp_path / "generate.log")
    assert rc == 0, (tmp_path / "generate.log").read_text()[-3000:]
    assert json.loads(out.read_text().splitlines()[0])["token_ids"] == seq[len(ids):]


# ------------------------------------------------------------------ the example scripts of Aquila-7B
SCRIPTS = sorted(p.name for p in (ROOT / "examples" / "aquila2").glob("*_aquila_7b_*.sh"))
COMMANDS = {"pretrain": "aquila_npu.pretrain", "tune": "aquila_npu.pretrain", "generate": "aquila_npu.generate",
            "evaluate": "aquila_npu.evaluate"}


def test_every_aquila2_7b_script_has_an_aquila_7b_twin():
    twins = {p.name.replace("aquila2_7b", "aquila_7b") for p in (ROOT / "examples" / "aquila2").glob("*_aquila2_7b_*")
             if "qlora" not in p.name}
    assert twins == set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_aquila_7b_scripts_run_the_commands_with_modellinks_layout(script, tmp_path):
    """ModelLink's Aquila-7B layout (tp8-pp1 on 8 devices, fp16 training), the aquila-7b architecture, FlagAI's
    folder as the tokenizer, Aquila-7B's paths; the flags parse with the real parser."""
    import importlib
    import subprocess

    from aquila_npu.models import arch_flags

    path = ROOT / "examples" / "aquila2" / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    launcher, module, argv = stub_torchrun_argv(path, tmp_path)
    assert module == COMMANDS[script.split("_")[0]]
    cli = importlib.import_module(module.replace("aquila_npu.", "aquila_npu.cli."))
    args = cli.parse(argv) if module == "aquila_npu.pretrain" else cli.build_parser().parse_args(argv)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (8, 1)
    assert int(launcher["--nproc_per_node"]) * int(launcher["--nnodes"]) == 8
    spec = MODELS["aquila-7b"]
    arch_flags.check(spec, arch_flags.given(args), "published model", padded_vocab=spec.vocab_size, tp=8)
    assert args.load == "./model_weights/Aquila-7B-v0.1-tp8-pp1/"
    assert args.tokenizer_name_or_path == "./model_from_flagai/aquila-7b/"
    if module == "aquila_npu.pretrain":
        assert args.fp16 and "Aquila-7B" in args.data_path[0] and "Aquila-7B" in args.save


# ------------------------------------------------------------------ selfcheck --hf-dir: the class the folder names
def _selfcheck(load, hf_dir, out, pythonpath=None):
    import subprocess
    import sys

    env = child_env()
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env["PYTHONPATH"]])
    proc = subprocess.run([sys.executable, "-m", "aquila_npu.selfcheck", "--device", "cpu", "--load", load,
                           "--hf-dir", hf_dir, "--out", out], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_selfcheck_compares_with_the_class_the_folder_names(tmp_path, capsys):
    """An Aquila2 folder as BAAI's repos hold it (AquilaForCausalLM, model_type aquila): BAAI's class from FlagAI's
    package where it is installed (here: the wheel's files on PYTHONPATH), else LlamaForCausalLM, saying which; a
    llama folder: LlamaForCausalLM."""
    from aquila_npu.testing.tiny_hf import tiny_llama

    root = flagai_root()
    tiny_llama().save_pretrained(tmp_path / "llama")
    shutil.copytree(tmp_path / "llama", tmp_path / "aquila")
    cfg = json.loads((tmp_path / "aquila" / "config.json").read_text())
    cfg.update(architectures=["AquilaForCausalLM"], model_type="aquila")
    (tmp_path / "aquila" / "config.json").write_text(json.dumps(cfg))
    _to_mg(capsys, tmp_path / "llama", tmp_path / "mg", 1, 1)
    stdout, r = _selfcheck(tmp_path / "mg", tmp_path / "aquila", tmp_path / "a.json", pythonpath=root)
    assert r["ok"] and r["reference"] == "AquilaForCausalLM (BAAI's code: flagai.model.aquila2.modeling_aquila)"
    assert "reference: AquilaForCausalLM" in stdout
    _, r = _selfcheck(tmp_path / "mg", tmp_path / "aquila", tmp_path / "b.json")
    assert r["ok"] and r["reference"].startswith("LlamaForCausalLM (transformers; ") and "names AquilaForCausalLM" \
        in r["reference"]
    _, r = _selfcheck(tmp_path / "mg", tmp_path / "llama", tmp_path / "c.json", pythonpath=root)
    assert r["ok"] and r["reference"] == "LlamaForCausalLM (transformers)"


def test_flagai_model_trains_tunes_with_lora_and_evaluates_through_the_commands(tokenizer_folder, shared_data_dir,
                                                                              tmp_path, capsys):
    """The first generation through the same commands as Aquila2: FlagAI folder -> convert; instruction data
    rendered with AquilaChat-7B's template and FlagAI's tokenizer (the folder); SFT, then LoRA from the SFT
    checkpoint; BoolQ (the real dev rows) from the SFT checkpoint."""
    from aquila_npu.cli.evaluate import main as evaluate_main
    from aquila_npu.cli.pretrain import main as pretrain_main
    from aquila_npu.weights.table import LORA_TARGETS
    from helpers import instruction_rows, preprocess_instructions

    folder = tokenizer_folder
    _to_mg(capsys, folder, tmp_path / "mg", 1, 1)
    data = preprocess_instructions(instruction_rows(), str(folder), str(tmp_path / "sft" / "alpaca"),
                                   "--prompt-type", "aquila-chat", "--append-eod")
    common = ["--micro-batch-size", 2, "--global-batch-size", 4, "--seq-length", 64, "--lr", 1e-3,
              "--lr-decay-style", "constant", "--log-interval", 1, "--eval-interval", 1000, "--train-iters", 3,
              "--tokenizer-name-or-path", folder, "--data-path", data, "--finetune", "--is-instruction-dataset",
              "--device", "cpu"]
    runs = {"sft": [*common, "--load", tmp_path / "mg", "--save", tmp_path / "sft-ck"],
            "lora": [*common, "--load", tmp_path / "sft-ck", "--save", tmp_path / "lora-ck", "--lora-target-modules",
                     *LORA_TARGETS, "--lora-r", 4, "--lora-alpha", 8]}
    for name, argv in runs.items():
        log = tmp_path / f"{name}.log"
        assert forked(functools.partial(pretrain_main, [str(a) for a in argv]), log) == 0, log.read_text()[-3000:]
    boolq = tmp_path / "boolq.jsonl"
    rows = (shared_data_dir / "boolq" / "dev.jsonl").read_text().splitlines()[:6]
    boolq.write_text("\n".join(rows) + "\n")
    out = tmp_path / "boolq.json"
    argv = ["--task", "boolq", "--task-data-path", boolq, "--load", tmp_path / "sft-ck", "--tokenizer-name-or-path",
            folder, "--micro-batch-size", 2, "--output", out, "--device", "cpu"]
    log = tmp_path / "evaluate.log"
    assert forked(functools.partial(evaluate_main, [str(a) for a in argv]), log) == 0, log.read_text()[-3000:]
    assert json.loads(out.read_text())["total"] == 6
