"""tools/preprocess_data.py (issue 4): the output read back with megatron-core's own IndexedDataset and checked against
the tokenizer's own encode output; instruction labels ignored exactly over the prompt; bad input fails cleanly.

Most runs call ``aquila_npu.data.preprocess.main`` in this process (the wrapper is ``sys.exit(main())``); the worker
and exit-status tests run the real command line. The tokenizer is a small byte-level BPE trained here with the
``tokenizers`` library; one test uses the real Aquila2 tokenizer and alpaca parquet from ../shared/data.
"""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import ALPACA_SYSTEM, AQUILA_SYSTEM, ROOT, ROWS, TEXTS, assert_one_line_error, child_env
from helpers import train_data_tokenizer as _train_tokenizer

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

from aquila_npu.cli.preprocess import main

TOOL = str(ROOT / "tools" / "preprocess_data.py")
IGNORE = -100


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tokenizer directory, the same documents as parquet / jsonl / json array, and the alpaca rows as parquet."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("pp")
    tok_dir = _train_tokenizer(d / "tokenizer")
    docs = [{"id": i, "text": t} for i, t in enumerate(TEXTS)]
    pq.write_table(pa.Table.from_pylist(docs), d / "docs.parquet", row_group_size=3)
    with open(d / "docs.jsonl", "w", encoding="utf-8") as f:
        for r in docs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(d / "docs.json", "w", encoding="utf-8") as f:
        json.dump(docs, f, ensure_ascii=False, indent=1)
    alpaca = [dict(r, text=r["instruction"] + "\n" + r["output"]) for r in ROWS]
    pq.write_table(pa.Table.from_pylist(alpaca), d / "alpaca.parquet")
    return {"dir": d, "tok_dir": tok_dir, "tok": AutoTokenizer.from_pretrained(tok_dir)}


def _run(args, capsys=None):
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err if capsys else ""
    if rc == 2 and capsys:
        assert_one_line_error(err)
    return rc, err


def _outputs(directory):
    """The datasets in ``directory`` and anything a run left behind (temporary files and locks are hidden names)."""
    return sorted(p for p in os.listdir(directory) if p.endswith((".bin", ".idx")) or p.startswith("."))


def _docs(prefix):
    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "json"])
def test_pretrain_documents_equal_tokenizer_output(env, tmp_path, fmt):
    out = tmp_path / "out" / "corpus"  # the output directory does not exist yet
    rc, _ = _run(["--input", env["dir"] / f"docs.{fmt}", "--tokenizer-name-or-path", env["tok_dir"],
                  "--output-prefix", out, "--tokenizer-type", "PretrainedFromHF", "--append-eod",
                  "--chunk-size", "3", "--log-interval", "2"])
    assert rc == 0
    tok = env["tok"]
    expected = [tok(t)["input_ids"] + [tok.eos_token_id] for t in TEXTS if t]
    got = _docs(f"{out}_text_document")
    assert got == expected
    ds = IndexedDataset(f"{out}_text_document")
    assert ds.index.dtype == np.uint16  # megatron-core's choice for a vocabulary below 65500
    assert len(ds.document_indices) == len(expected) + 1
    assert _outputs(tmp_path / "out") == ["corpus_text_document.bin", "corpus_text_document.idx"]


def test_pretrain_without_eod_and_two_keys(env, tmp_path):
    path = tmp_path / "two.jsonl"
    rows = [{"text": t, "title": t[:5]} for t in TEXTS if t]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    rc, _ = _run(["--input", path, "--tokenizer-name-or-path", env["tok_dir"], "--output-prefix", tmp_path / "o",
                  "--json-keys", "text", "title"])
    assert rc == 0
    tok = env["tok"]
    assert _docs(tmp_path / "o_text_document") == [tok(r["text"])["input_ids"] for r in rows]
    assert _docs(tmp_path / "o_title_document") == [tok(r["title"])["input_ids"] for r in rows]


def test_directory_and_glob_inputs_in_sorted_order(env, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name, texts in (("b.jsonl", TEXTS[4:]), ("a.jsonl", TEXTS[:4])):
        (src / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    (src / "notes.txt").write_text("not data")
    tok = env["tok"]
    expected = [tok(t)["input_ids"] for t in TEXTS if t]
    for i, spec in enumerate((src, src / "*.jsonl")):
        assert _run(["--input", spec, "--tokenizer-name-or-path", env["tok_dir"],
                     "--output-prefix", tmp_path / f"o{i}"])[0] == 0
        assert _docs(tmp_path / f"o{i}_text_document") == expected


def _alpaca_expected(tok, row, eod=True):
    prompt = ("\n" + ALPACA_SYSTEM + "\n" + "### Instruction:\n" + row["instruction"] + "\n" + row["input"] + "\n"
              + "### Response:\n")
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    a = tok(row["output"] + "\n", add_special_tokens=False)["input_ids"]
    ids = p + a + ([tok.eos_token_id] if eod else [])
    return ids, len(p)


def _check_packed(prefix, expected):
    ids, mask, labels = (_docs(f"{prefix}_packed_{k}_document") for k in ("input_ids", "attention_mask", "labels"))
    assert len(ids) == len(expected)
    for (want, n_prompt), got, m, lab in zip(expected, ids, mask, labels):
        assert got == want
        assert m == [1] * len(want)
        assert lab[:n_prompt] == [IGNORE] * n_prompt  # ignored exactly over the prompt ...
        assert lab[n_prompt:] == want[n_prompt:]  # ... and nowhere else
    return ids, labels


def test_instruction_alpaca_labels_ignored_exactly_on_prompt(env, tmp_path):
    prefix = tmp_path / "alpaca"
    rc, _ = _run(["--input", env["dir"] / "alpaca.parquet", "--tokenizer-name-or-path", env["tok_dir"],
                  "--output-prefix", prefix, "--workers", "1", "--log-interval", "1000",
                  "--tokenizer-type", "PretrainedFromHF", "--handler-name", "GeneralInstructionHandler",
                  "--append-eod"])
    assert rc == 0
    _check_packed(prefix, [_alpaca_expected(env["tok"], r) for r in ROWS])
    assert _outputs(tmp_path) == sorted(f"alpaca_packed_{k}_document.{e}" for k in ("input_ids", "attention_mask",
                                                                                  "labels") for e in ("bin", "idx"))
    assert IndexedDataset(f"{prefix}_packed_labels_document").index.dtype == np.int32


def test_instruction_chat_template_multi_turn(env, tmp_path):
    """aquila-legacy (AquilaChat2-34B): human turns and role markers ignored, each answer + its </s> trained; with
    --append-eod the </s> that already ends the sample is not doubled."""
    conv = [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"},
            {"from": "human", "value": "你好吗"}, {"from": "gpt", "value": "很好"}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"conversations": conv}, ensure_ascii=False) + "\n", encoding="utf-8")
    rc, _ = _run(["--input", path, "--tokenizer-name-or-path", env["tok_dir"], "--output-prefix", tmp_path / "c",
                  "--handler-name", "GeneralInstructionHandler", "--prompt-type", "aquila-legacy",
                  "--conversation-key", "conversations", "--append-eod"])
    assert rc == 0
    tok = env["tok"]

    def enc(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    p1 = enc(AQUILA_SYSTEM + "\n\n" + "### Human: Hi there\n### Assistant: ")
    a1 = enc("Hello!</s>")
    p2 = enc("### Human: 你好吗\n### Assistant: ")
    a2 = enc("很好</s>")
    assert a2[-1] == tok.eos_token_id
    (ids,), (labels,) = [_docs(f"{tmp_path / 'c'}_packed_{k}_document") for k in ("input_ids", "labels")]
    assert ids == p1 + a1 + p2 + a2
    assert labels == [IGNORE] * len(p1) + a1 + [IGNORE] * len(p2) + a2


def test_instruction_aquila_v1_single_turn(env, tmp_path):
    rc, _ = _run(["--input", env["dir"] / "alpaca.parquet", "--tokenizer-name-or-path", env["tok_dir"],
                  "--output-prefix", tmp_path / "v1", "--handler-name", "GeneralInstructionHandler",
                  "--prompt-type", "aquila-v1"])
    assert rc == 0
    tok = env["tok"]
    expected = []
    for r in ROWS:
        q = r["instruction"] + ("\n" + r["input"] if r["input"] else "")
        p = tok("<|startofpiece|>" + q + "<|endofpiece|>", add_special_tokens=False)["input_ids"]
        expected.append((p + tok(r["output"] + "</s>", add_special_tokens=False)["input_ids"], len(p)))
    _check_packed(tmp_path / "v1", expected)


def test_workers_two_processes_same_bytes_as_one(env, tmp_path, capsys):
    """The real command line with --workers 2 (two processes; small chunks, so many in flight) writes byte-identical
    files to --workers 1, and both report progress every --log-interval documents with docs/s and MB/s."""
    src = tmp_path / "many.jsonl"
    src.write_text("".join(json.dumps({"text": f"{TEXTS[i % len(TEXTS)]} {i}"}) + "\n" for i in range(400)),
                   encoding="utf-8")
    args = ["--input", src, "--tokenizer-name-or-path", env["tok_dir"], "--log-interval", "100", "--chunk-size", "16",
            "--append-eod"]
    rc, err = _run(args + ["--output-prefix", tmp_path / "w1", "--workers", "1"], capsys)
    assert rc == 0 and "Processed 100 documents (" in err and "Processed 400 documents (" in err
    proc = subprocess.run([sys.executable, TOOL, *map(str, args), "--output-prefix", str(tmp_path / "w2"),
                           "--workers", "2"], env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    progress = [line for line in proc.stderr.splitlines() if line.startswith("Processed ")]
    assert [line.split(" (")[0] for line in progress] == [f"Processed {n} documents" for n in (100, 200, 300, 400)]
    assert all(line.endswith("MB/s).") and " docs/s, " in line for line in progress)
    assert "2 worker(s)" in proc.stdout
    for ext in (".bin", ".idx"):
        assert open(f"{tmp_path / 'w1'}_text_document{ext}", "rb").read() == \
            open(f"{tmp_path / 'w2'}_text_document{ext}", "rb").read()
    tok = env["tok"]
    assert _docs(tmp_path / "w2_text_document")[::97] == [
        tok(f"{TEXTS[i % len(TEXTS)]} {i}")["input_ids"] + [tok.eos_token_id] for i in range(0, 400, 97)]


def _bad_jsonl_late(path):
    """Twenty good rows, then a line of invalid UTF-8: fails after output has been written to temporary files."""
    good = "".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(20)).encode()
    path.write_bytes(good + b'{"text": "caf\xe9"}\n')
    return "line 21", "UTF-8"


def _missing_column_parquet(path):
    pq.write_table(pa.table({"content": ["a", "b"]}), path)
    return "no column 'text'", "--json-keys"


def _missing_column_jsonl(path):
    path.write_text('{"text": "ok"}\n{"body": "no text here"}\n')
    return "line 2", "no column 'text'"


def _empty_jsonl(path):
    path.write_bytes(b"")
    return "empty file", str(path)


def _empty_parquet(path):
    pq.write_table(pa.table({"text": pa.array([], type=pa.string())}), path)
    return "empty file", str(path)


def _bad_utf8_json_array(path):
    path.write_bytes(b'[{"text": "ok"},\n {"text": "bad \xff byte"},\n {"text": "ok"}]')
    return "row 2", "UTF-8"


def _bad_utf8_parquet(path):
    raw = pa.array([b"ok", b"bad\xff"], type=pa.binary())
    pq.write_table(pa.table({"text": pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())}), path)
    return "row 2", "UTF-8"


def _not_text(path):
    path.write_text('{"text": 42}\n')
    return "line 1", "holds int"


BAD_INPUTS = {"bad-utf8-jsonl-late": ("jsonl", _bad_jsonl_late), "missing-column-parquet":
              ("parquet", _missing_column_parquet), "missing-column-jsonl": ("jsonl", _missing_column_jsonl),
              "empty-jsonl": ("jsonl", _empty_jsonl), "empty-parquet": ("parquet", _empty_parquet),
              "bad-utf8-json-array": ("json", _bad_utf8_json_array), "bad-utf8-parquet": ("parquet", _bad_utf8_parquet),
              "not-text": ("jsonl", _not_text)}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_clear_error_nothing_left(env, tmp_path, capsys, case):
    ext, make = BAD_INPUTS[case]
    src = tmp_path / f"bad.{ext}"
    needles = make(src)
    out = tmp_path / "out"
    out.mkdir()
    rc, err = _run(["--input", src, "--tokenizer-name-or-path", env["tok_dir"], "--output-prefix", out / "x",
                    "--chunk-size", "2", "--workers", "1"], capsys)
    assert rc == 2
    assert err.strip().splitlines()[-1].startswith("preprocess_data.py: error: ")
    for needle in needles:
        assert needle in err, err
    assert _outputs(out) == []


def test_bad_instruction_rows(env, tmp_path, capsys):
    src = tmp_path / "rows.jsonl"
    src.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    rc, err = _run(["--input", src, "--tokenizer-name-or-path", env["tok_dir"], "--output-prefix", tmp_path / "x",
                    "--handler-name", "GeneralInstructionHandler"], capsys)
    assert rc == 2 and "line 2" in err and "no column 'output'" in err
    src.write_text(json.dumps({"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}]}))
    rc, err = _run(["--input", src, "--tokenizer-name-or-path", env["tok_dir"], "--output-prefix", tmp_path / "x",
                    "--handler-name", "GeneralInstructionHandler", "--conversation-key", "conversations"], capsys)
    assert rc == 2 and "line 1" in err and "--conversation-key" in err
    assert _outputs(tmp_path) == []


def test_failed_run_keeps_previous_output(env, tmp_path, capsys):
    prefix = tmp_path / "keep"
    assert _run(["--input", env["dir"] / "docs.jsonl", "--tokenizer-name-or-path", env["tok_dir"],
                 "--output-prefix", prefix])[0] == 0
    before = open(f"{prefix}_text_document.bin", "rb").read()
    bad = tmp_path / "bad.jsonl"
    _bad_jsonl_late(bad)
    assert _run(["--input", bad, "--tokenizer-name-or-path", env["tok_dir"], "--output-prefix", prefix,
                 "--chunk-size", "2"], capsys)[0] == 2
    assert open(f"{prefix}_text_document.bin", "rb").read() == before
    assert _outputs(tmp_path) == ["keep_text_document.bin", "keep_text_document.idx"]


@pytest.mark.parametrize("args, needle", [
    (["--tokenizer-name-or-path", "{tmp}/no/such/tokenizer"],
     "--tokenizer-name-or-path: {tmp}/no/such/tokenizer does not exist"),
    (["--tokenizer-name-or-path", "{tmp}"], "--tokenizer-name-or-path: cannot load a tokenizer from {tmp}"),
    (["--input", "{tmp}/missing.parquet"], "--input: {tmp}/missing.parquet does not exist"),
    (["--input", "{tmp}/*.parquet"], "--input: the pattern {tmp}/*.parquet matches no"),
    (["--workers", "0"], "--workers must be at least 1"),
])
def test_bad_flags(env, tmp_path, capsys, args, needle):
    argv = {"--input": str(env["dir"] / "docs.jsonl"), "--tokenizer-name-or-path": env["tok_dir"],
            "--output-prefix": str(tmp_path / "x")}
    argv.update(dict(zip(args[::2], [a.format(tmp=tmp_path) for a in args[1::2]])))
    rc, err = _run([x for kv in argv.items() for x in kv], capsys)
    assert rc == 2
    assert needle.format(tmp=tmp_path) in err, err
    assert _outputs(tmp_path) == []


def test_command_line_exit_status_and_help(tmp_path):
    proc = subprocess.run([sys.executable, TOOL, "--input", "x.jsonl", "--tokenizer-name-or-path",
                           str(tmp_path / "nope"), "--output-prefix", str(tmp_path / "x")],
                          env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"preprocess_data.py: error: --tokenizer-name-or-path: {tmp_path / 'nope'} does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    helptext = subprocess.run([sys.executable, TOOL, "--help"], env=child_env(), capture_output=True, text=True,
                              timeout=120).stdout
    for flag in ("--input", "--json-keys", "--handler-name", "--prompt-type", "--conversation-key", "--tokenizer-type",
                 "--tokenizer-name-or-path", "--tokenizer-not-use-fast", "--append-eod", "--output-prefix",
                 "--workers", "--log-interval", "GeneralInstructionHandler", "_packed_labels_document", "aquila-v1"):
        assert flag in helptext, flag


def test_real_tokenizer_and_alpaca_parquet(shared_data, tmp_path):
    """The real Aquila2 tokenizer on the real alpaca parquet, both modes as the ModelLink README runs them."""
    from transformers import AutoTokenizer

    tok_dir = shared_data / "aquila2-tokenizer"
    parquet = shared_data / "alpaca" / "alpaca_5000.parquet"
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert tok.eos_token_id == 100007 and len(tok) == 100008
    rows = pq.read_table(parquet).slice(0, 400).to_pylist()
    common = ["--input", parquet, "--tokenizer-name-or-path", tok_dir, "--workers", "1", "--log-interval", "1000",
              "--tokenizer-type", "PretrainedFromHF"]
    assert _run(common + ["--output-prefix", tmp_path / "pt" / "alpaca"])[0] == 0
    ds = IndexedDataset(str(tmp_path / "pt" / "alpaca_text_document"))
    assert len(ds) == 5000 and ds.index.dtype == np.int32
    assert [ds[i].tolist() for i in range(len(rows))] == [tok(r["text"])["input_ids"] for r in rows]

    prefix = tmp_path / "ft" / "alpaca"
    assert _run(common + ["--output-prefix", prefix, "--handler-name", "GeneralInstructionHandler",
                          "--append-eod"])[0] == 0
    ids, labels = (IndexedDataset(f"{prefix}_packed_{k}_document") for k in ("input_ids", "labels"))
    assert len(ids) == len(labels) == 5000
    for i, row in enumerate(rows):
        want, n_prompt = _alpaca_expected(tok, row)
        assert ids[i].tolist() == want and want[-1] == 100007
        lab = labels[i].tolist()
        assert lab[:n_prompt] == [IGNORE] * n_prompt and lab[n_prompt:] == want[n_prompt:]
