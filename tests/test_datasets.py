"""aquila_npu.data.datasets (issue 4): training datasets over preprocess_data.py output.

GPTDataset samples are checked against the tokenizer's own output laid end to end in megatron-core's document order;
instruction samples against the prompt / answer tokens of ModelLink's alpaca template (loss_mask 0 exactly on the
prompt and padding). Single process without torch.distributed, and under torchrun (2 gloo ranks).
"""

import hashlib
import json
import os
import sys
import warnings

import numpy as np
import pytest
import torch

from helpers import torchrun

from aquila_npu.data.datasets import build_instruction_datasets, build_pretrain_datasets, parse_data_path
from aquila_npu.errors import DataError
from aquila_npu.cli.preprocess import main
from helpers import ALPACA_SYSTEM, ROWS, TEXTS, train_data_tokenizer as _train_tokenizer

SEQ = 16


def _texts(n):
    return [f"{TEXTS[i % len(TEXTS)] or 'empty'} number {i} " + "more words " * (i % 7) for i in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("ds")
    tok_dir = _train_tokenizer(d / "tokenizer")
    texts = {"a": _texts(60), "b": [t.upper() for t in _texts(40)]}
    for name, items in texts.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in items), encoding="utf-8")
        assert main(["--input", str(d / f"{name}.jsonl"), "--tokenizer-name-or-path", tok_dir,
                     "--output-prefix", str(d / name), "--append-eod"]) == 0
    rows = [dict(r, instruction=f"{r['instruction']} ({i})") for i, r in enumerate(ROWS * 6)]
    (d / "sft.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert main(["--input", str(d / "sft.jsonl"), "--tokenizer-name-or-path", tok_dir, "--output-prefix",
                 str(d / "sft"), "--handler-name", "GeneralInstructionHandler", "--append-eod"]) == 0
    return {"dir": d, "tok_dir": tok_dir, "tok": AutoTokenizer.from_pretrained(tok_dir), "texts": texts, "rows": rows}


def _reference_docs(data, name):
    tok = data["tok"]
    return [tok(t)["input_ids"] + [tok.eos_token_id] for t in data["texts"][name]]


def test_parse_data_path():
    assert parse_data_path("a/b_text_document") == (["a/b_text_document"], None)
    assert parse_data_path("0.3 p1 0.7 p2") == (["p1", "p2"], [0.3, 0.7])
    assert parse_data_path(["1", "p1", "3", "p2"]) == (["p1", "p2"], [1.0, 3.0])
    assert parse_data_path(["p1", "p2"]) == (["p1", "p2"], None)
    with pytest.raises(DataError, match="--data-path"):
        parse_data_path("")


def _window(ds, docs, i):
    """The expected sample i of a megatron-core GPTDataset: SEQ + 1 tokens of the reference documents laid end to end
    in the dataset's own (shuffled, epoch-repeating) document order, at the offset of its (shuffled) sample."""
    j = int(ds.shuffle_index[i])
    stream = np.concatenate([docs[d] for d in ds.document_index])
    return stream[j * SEQ: j * SEQ + SEQ + 1]


def test_gpt_dataset_samples_are_windows_of_the_tokenized_documents(data):
    prefix = str(data["dir"] / "a_text_document")
    train, valid, test = build_pretrain_datasets(prefix, "80,20,0", SEQ, 1234, data["tok_dir"],
                                                 data_cache_path=str(data["dir"] / "cache"))
    assert test is None and type(train).__name__ == "GPTDataset" and len(train) > 10 and len(valid) > 0
    assert set(train.indices.tolist()).isdisjoint(valid.indices.tolist())
    docs = _reference_docs(data, "a")
    for ds in (train, valid):
        for i in range(len(ds)):
            window = _window(ds, docs, i)
            sample = ds[i]
            assert sample["tokens"].dtype == torch.int64 and sample["tokens"].shape == (SEQ,)
            assert sample["tokens"].tolist() == window[:-1].tolist()
            assert sample["labels"].tolist() == window[1:].tolist()
            # all ones: the literal "<|endoftext|>" in the data (id 0, the HF pad) keeps its loss
            assert sample["loss_mask"].dtype == torch.float32 and bool((sample["loss_mask"] == 1).all())
            assert sample["position_ids"].tolist() == list(range(SEQ))


def test_weighted_blend_in_one_process(data):
    a, b = (str(data["dir"] / f"{n}_text_document") for n in "ab")
    cache = str(data["dir"] / "blend_cache")  # also the path where megatron-core asks for a process-group rank
    built = [build_pretrain_datasets(f"1 {a} 3 {b}", "90,10,0", SEQ, 7, data["tok_dir"], [200, 20, None],
                                     data_cache_path=cache) for _ in range(2)]  # the second one hits the cache
    train, valid, test = built[0]
    assert type(train).__name__ == "BlendedDataset" and (len(train), len(valid), test) == (200, 20, None)
    counts = np.bincount([int(train[i]["dataset_id"]) for i in range(len(train))], minlength=2)
    assert abs(counts[0] - 50) <= 1 and abs(counts[1] - 150) <= 1
    docs = [_reference_docs(data, "a"), _reference_docs(data, "b")]
    for i in range(0, 200, 7):
        s = train[i]
        k, j = int(train.dataset_index[i]), int(train.dataset_sample_index[i])
        assert int(s["dataset_id"]) == k
        assert s["tokens"].tolist() == _window(train.datasets[k], docs[k], j)[:-1].tolist()
        assert built[1][0][i]["tokens"].tolist() == s["tokens"].tolist()


def _prompt_answer(tok, row):
    prompt = ("\n" + ALPACA_SYSTEM + "\n" + "### Instruction:\n" + row["instruction"] + "\n" + row["input"] + "\n"
              + "### Response:\n")
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    a = tok(row["output"] + "\n", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p, a


@pytest.mark.parametrize("seq", [256, 48])
def test_instruction_dataset_loss_mask_zero_exactly_on_prompt(data, seq):
    train, valid, test = build_instruction_datasets(str(data["dir"] / "sft"), "100,0,0", seq, 3,
                                                    tokenizer=data["tok_dir"])
    assert valid is None and test is None and len(train) == len(data["rows"])
    assert sorted(train.order.tolist()) == list(range(len(data["rows"])))  # one epoch, shuffled
    tok = data["tok"]
    pad = tok.pad_token_id
    for i in range(len(train)):
        s = train[i]
        p, a = _prompt_answer(tok, data["rows"][int(train.order[i])])
        full = p + a
        n = min(len(full) - 1, seq)  # real positions: inputs full[:-1], targets full[1:], cut to seq
        assert {k: (v.dtype, tuple(v.shape)) for k, v in s.items()} == {
            "tokens": (torch.int64, (seq,)), "labels": (torch.int64, (seq,)), "loss_mask": (torch.float32, (seq,)),
            "position_ids": (torch.int64, (seq,))}
        assert s["tokens"].tolist() == full[:n] + [pad] * (seq - n)
        want_mask = [1.0 if len(p) - 1 <= k < n else 0.0 for k in range(seq)]
        assert s["loss_mask"].tolist() == want_mask
        labels = s["labels"].tolist()
        assert [labels[k] for k in range(seq) if want_mask[k]] == full[len(p):n + 1]
        assert s["position_ids"].tolist() == list(range(seq))


def test_instruction_dataset_epochs_split_and_attention_mask(data):
    prefix = str(data["dir"] / "sft")
    train, valid, _ = build_instruction_datasets(prefix, "75,25,0", 64, 11, [50, 9, 0], create_attention_mask=True)
    n_train, n_valid = len(train.indices), len(valid.indices)
    assert (len(train), len(valid)) == (50, 9) and n_train + n_valid == len(data["rows"])
    assert sorted(train.order[:n_train].tolist()) == train.indices.tolist()  # each epoch is a permutation
    assert set(valid.order.tolist()) <= set(valid.indices.tolist())
    mask = train[0]["attention_mask"]
    assert mask.dtype == torch.bool and mask.shape == (1, 64, 64)
    assert torch.equal(mask[0], torch.ones(64, 64, dtype=torch.bool).triu(1))  # True = masked (future positions)
    blended = build_instruction_datasets(f"1 {prefix} 1 {prefix}_packed", "100,0,0", 64, 11, [30, None, None])[0]
    assert len(blended) == 30 and set(blended[0]) >= {"tokens", "labels", "loss_mask", "position_ids"}


def test_bad_data_paths(data, tmp_path):
    with pytest.raises(DataError, match="--data-path: .*nope_text_document.bin"):
        build_pretrain_datasets(str(tmp_path / "nope_text_document"), "100,0,0", SEQ, 1, data["tok_dir"])
    with pytest.raises(DataError, match="--data-path: .*nope_packed_input_ids_document.idx not found"):
        build_instruction_datasets(str(tmp_path / "nope"), "100,0,0", SEQ, 1)
    a = str(data["dir"] / "a_text_document")
    with pytest.raises(DataError, match="sample count for the train split"):
        build_pretrain_datasets(f"1 {a} 1 {a}", "100,0,0", SEQ, 1, data["tok_dir"])


def _digest(ds):
    h = hashlib.sha256()
    for i in range(len(ds)):
        for key in ("tokens", "labels", "loss_mask"):
            h.update(ds[i][key].numpy().tobytes())
    return h.hexdigest()[:16]


def _worker(directory, tok_dir):
    """Under torchrun: build both kinds on every rank (megatron-core builds rank 0 first, then the rest from its
    cache) and print what each rank sees."""
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    pre = build_pretrain_datasets(f"1 {directory}/a_text_document 3 {directory}/b_text_document", "90,10,0", SEQ, 7,
                                  tok_dir, [200, 20, 0], data_cache_path=f"{directory}/dist_cache")
    sft = build_instruction_datasets(f"{directory}/sft", "75,25,0", 64, 11, [50, 9, 0])
    print(f"RANK {rank} {_digest(pre[0])} {_digest(pre[1])} {_digest(sft[0])} {_digest(sft[1])}", flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_under_torchrun_every_rank_sees_the_same_samples(data):
    d, tok_dir = str(data["dir"]), data["tok_dir"]
    proc = torchrun("tests/test_datasets.py", 2, ["--worker", d, tok_dir], timeout=600)
    lines = sorted(line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("RANK "))
    pre = build_pretrain_datasets(f"1 {d}/a_text_document 3 {d}/b_text_document", "90,10,0", SEQ, 7, tok_dir,
                                  [200, 20, 0], data_cache_path=f"{d}/dist_cache")
    sft = build_instruction_datasets(f"{d}/sft", "75,25,0", 64, 11, [50, 9, 0])
    here = [_digest(pre[0]), _digest(pre[1]), _digest(sft[0]), _digest(sft[1])]
    assert lines == [["0", *here], ["1", *here]], proc.stdout[-2000:]


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    warnings.simplefilter("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _worker(sys.argv[2], sys.argv[3])
