"""Left-padded batches (generation and scoring) vs Hugging Face on the same tiny random model, one row at a time.

Our side runs in a child process on the converted tp1 checkpoint (never in this process: see DEVELOPERS.md); the
references are HF's greedy ``generate`` and HF's logits, computed here on the model built from its config.
"""

import json
import subprocess
import sys

import pytest
import torch

from aquila_npu.testing.tiny_hf import tiny_llama
from helpers import build_assets, child_env, words

PROMPTS = ["kalo mi taren", "北京是中国的首都，今天天气很好", "ber fy ost ung dar el quin vex po shu ta mi lo ka ren po"]
N_NEW = 12

WORKER = """
import json, sys
from aquila_npu.checkpoint.load_model import load_model_for_inference
from aquila_npu.checkpoint.megatron_io import CheckpointInfo
from aquila_npu.data.tokenizer import load_tokenizer
from aquila_npu.device.setup import setup
from aquila_npu.evaluation.scoring import Scorer
from aquila_npu.inference import generation
load, hf, job = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
dev = setup("cpu")
loaded = load_model_for_inference(CheckpointInfo.read(load), dev)
tok = load_tokenizer(hf)
gen = generation.TextGenerator.from_loaded(loaded, dev.torch_device)
ids = [tok.encode(p) for p in job["prompts"]]
out = {"kv": [g.token_ids for g in gen.generate(ids, job["n"])],
       "recompute": [g.token_ids for g in gen.generate(ids, job["n"], use_kv_cache=False)]}
generation.takes_padding_masks = lambda model: False  # the path for attention kernels without padding masks
out["right_padded"] = [g.token_ids for g in gen.generate(ids, job["n"])]
scorer = Scorer(loaded.model, tok, vocab_size=loaded.vocab_size, max_length=loaded.spec.max_position_embeddings,
                batch_size=job["batch"], device=dev.torch_device, pad_id=0)
out["loglikelihood"] = scorer.loglikelihood([tuple(r) for r in job["requests"]])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(str(tmp_path_factory.mktemp("batched")), layouts=((1, 1),))


def _requests():
    """Contexts of different lengths with continuations of one to several tokens; one context longer than the
    model's 128 positions (its first tokens are dropped, as lm-eval does)."""
    import random

    rng = random.Random(3)
    contexts = [words(rng, n) for n in (2, 9, 25, 140)] + ["北京是中国的首都"]
    continuations = [" yes", " ka lo mi", " ber fy ost ung dar el", "今天天气很好"]
    return [(c, x) for c in contexts for x in continuations]


def _hf_loglikelihood(model, tok, requests, max_length):
    """lm-eval's rules (continuation = encode(ctx + cont) after encode(ctx), keep the last max_length + 1 tokens),
    each request alone: (sum of log p, greedy)."""
    out = []
    for ctx, cont in requests:
        ctx_ids = tok.encode(ctx)
        cont_ids = tok.encode(ctx + cont)[len(ctx_ids):]
        ids = (ctx_ids + cont_ids)[-(max_length + 1):][:-1]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        rows = logp[len(ids) - len(cont_ids):]
        target = torch.tensor(cont_ids)
        out.append((float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())))
    return out


def _hf_greedy_alone(model, tok, prompts, n):
    out = []
    for p in prompts:
        ids = torch.tensor([tok.encode(p)])
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=n, min_new_tokens=n, pad_token_id=tok.pad_token_id)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def _run_worker(assets, job):
    proc = subprocess.run([sys.executable, "-c", WORKER, assets[1, 1], assets["hf"], json.dumps(job)], env=child_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_left_padded_generation_and_scoring_equal_hf_row_by_row(assets):
    """One batch of prompts of different lengths generates what each prompt generates alone in HF (KV cache,
    full recompute, and the right-padded schedule for kernels without padding masks); log-likelihoods of
    continuations of one to several tokens after contexts of different lengths (batched, left-padded, logits only at
    the continuation's positions) equal HF's log-softmax of each request alone."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets["hf"])
    model = tiny_llama()
    model.generation_config.eos_token_id = None
    requests = _requests()
    out = _run_worker(assets, {"prompts": PROMPTS, "n": N_NEW, "batch": 8, "requests": requests})
    ref = _hf_greedy_alone(model, tok, PROMPTS, N_NEW)
    assert out["kv"] == ref
    assert out["recompute"] == ref
    assert out["right_padded"] == ref
    expected = _hf_loglikelihood(model, tok, requests, model.config.max_position_embeddings)
    assert len(out["loglikelihood"]) == len(expected) == 20
    for (lp, greedy), (ref_lp, ref_greedy) in zip(out["loglikelihood"], expected):
        assert lp == pytest.approx(ref_lp, abs=1e-4)
        assert greedy == ref_greedy
