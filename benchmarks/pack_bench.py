"""Packed vs padded fine-tuning, side by side in one run: response tokens per second, the attention's share of a
step and the peak memory of both layouts, on the real Alpaca rows.

    python benchmarks/pack_bench.py [--model aquila2-small] [--seq-length 2048 512] [--samples 32] [--iters 3]
                                    [--rows ../shared/data/alpaca/alpaca_5000.json] [--out FILE]

The rows are tokenized by ``tools/preprocess_data.py`` with the real Aquila2 tokenizer and ModelLink's alpaca
template; a random model of the registry architecture (aquila2-small: the real 100,008-token vocabulary) is converted
to a Megatron checkpoint and fine-tuned from it by ``aquila_npu.pretrain --finetune --is-instruction-dataset`` twice per
sequence length: padded (ModelLink's layout: one sample per sequence, global batch ``--samples`` sequences) and packed
(``--reset-attention-mask``: whole samples packed several to a sequence, global batch the sequences that hold about
``--samples`` samples, so both layouts learn from about the same samples per step). Response tokens per second are the
tokens with a loss over the time of the iterations after the first (the packed run takes ``--packed-iters-factor``
times as many iterations: its steps are short, and its sequences hold a varying share of response tokens); the
range of the per-iteration rates is recorded beside it. The
attention's share is the time of the attention kernels (SDPA forward and backward) in one micro-batch's forward and
backward under torch's profiler; peak memory is the process's peak resident memory (the CPU has no allocator
statistics). CPU figures are functional, not NPU or GPU throughput.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")


def _preprocess(rows: str, tokenizer: str, prefix: str) -> str:
    from aquila_npu.cli.preprocess import main as preprocess

    if preprocess(["--input", rows, "--tokenizer-name-or-path", tokenizer, "--output-prefix", prefix,
                   "--handler-name", "GeneralInstructionHandler", "--append-eod", "--workers", "1",
                   "--log-interval", "1000000"]):
        sys.exit("preprocessing failed")
    return prefix


def _train(a, workdir: str, name: str, base: str, data: str, tokenizer: str, seq: int, gbs: int, mbs: int,
           iters: int, extra) -> dict:
    metrics = os.path.join(workdir, f"{name}.jsonl")
    cmd = [sys.executable, "-m", "aquila_npu.pretrain", "--load", base, "--finetune", "--is-instruction-dataset",
           "--data-path", data, "--tokenizer-name-or-path", tokenizer, "--split", "100,0,0", "--seq-length", str(seq),
           "--micro-batch-size", str(mbs), "--global-batch-size", str(gbs), "--train-iters", str(iters),
           "--lr", "1e-5", "--lr-decay-style", "constant", "--log-interval", "1", "--eval-interval", "100000",
           "--device", "cpu", "--metrics-file", metrics, *extra]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(a.threads), PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{name} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    with open(metrics) as f:
        recs = [json.loads(line) for line in f]
    rates = [r["loss_tokens"] / r["step_time_s"] for r in recs[1:]]
    packing = next((line for line in proc.stdout.splitlines() if line.startswith("packed instruction data")), None)
    rate = sum(r["loss_tokens"] for r in recs[1:]) / sum(r["step_time_s"] for r in recs[1:])
    return {"response_tokens_per_s": rate, "response_tokens_per_s_range": [min(rates), max(rates)],
            "response_tokens_per_s_all": rates,
            "step_time_s": [r["step_time_s"] for r in recs], "loss_tokens": [r["loss_tokens"] for r in recs],
            "peak_rss_gb": max(r["memory"].get("max_rss_gb", 0.0) for r in recs), "lm_loss": recs[-1]["lm_loss"],
            "global_batch_size": gbs, "packing": packing}


def _attention_share(spec, base: str, data: str, tokenizer: str, seq: int, pack: bool) -> float:
    """The attention kernels' share of one micro-batch's forward and backward (torch profiler, self CPU time), in a
    child process (the device layer's set-up is per process)."""
    code = f"""
import json, sys, torch
from torch.profiler import ProfilerActivity, profile
sys.path.insert(0, {ROOT!r})
from aquila_npu.checkpoint.load_model import build_stage
from aquila_npu.checkpoint.megatron_io import CheckpointInfo
from aquila_npu.data.datasets import build_instruction_datasets
from aquila_npu.device.setup import setup
from aquila_npu.parallel import initialize_model_parallel
from aquila_npu.training.packing import DOCUMENT_IDS, fold, packed_params
torch.set_num_threads(1)
dev = setup("cpu"); initialize_model_parallel(1, 1)
info = CheckpointInfo.read({base!r})
model, _ = build_stage(info.spec, info.layout, dev, info.load_rank(0, 0)["model"], params_dtype=torch.float32,
                       pp_rank=0, parallel_output=True)
model.train()
ds = build_instruction_datasets({data!r}, "100,0,0", {seq}, 1234, [4, 0, 0], tokenizer={tokenizer!r},
                                pack={pack})[0]
sample = {{k: v[None] for k, v in ds[0].items()}}
packed = None
if DOCUMENT_IDS in sample:
    packed = packed_params(sample.pop(DOCUMENT_IDS), "cpu")
    sample = fold(sample)
def step():
    loss = model(sample["tokens"], sample["position_ids"], None, labels=sample["labels"], packed_seq_params=packed)
    (loss * sample["loss_mask"]).sum().backward()
step()
with profile(activities=[ProfilerActivity.CPU]) as prof:
    step()
events = prof.key_averages()
total = sum(e.self_cpu_time_total for e in events)
attention = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key or "flash_attention" in e.key)
print(json.dumps(attention / total))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    if proc.returncode:
        sys.exit(f"profile failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="aquila2-small")
    p.add_argument("--seq-length", type=int, nargs="+", default=[2048, 512])
    p.add_argument("--samples", type=int, default=32, help="samples per global batch (padded: that many sequences)")
    p.add_argument("--micro-batch-size", type=int, default=4, help="padded layout's micro-batch (packed: 1)")
    p.add_argument("--iters", type=int, default=4, help="iterations of a padded run; the first is not measured")
    p.add_argument("--packed-iters-factor", type=int, default=4,
                   help="a packed run measures this many times as many iterations (default 4)")
    p.add_argument("--threads", type=int, default=2, help="OMP threads of the training process")
    p.add_argument("--rows", default=os.path.join(SHARED, "alpaca", "alpaca_5000.json"))
    p.add_argument("--tokenizer", default=os.path.join(SHARED, "aquila2-tokenizer"))
    p.add_argument("--out", default=None, help="write the result as JSON (benchmarks/results/pack-vs-padded-*.json)")
    a = p.parse_args()
    for path in (a.rows, a.tokenizer):
        if not os.path.exists(path):
            sys.exit(f"{path}: not found (the real Alpaca rows and Aquila2 tokenizer live in ../shared/data)")

    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from aquila_npu.checkpoint.convert import to_megatron
    from aquila_npu.checkpoint.hf_io import HFReader
    from aquila_npu.data.datasets import instruction_positions
    from aquila_npu.data.packing import best_fit_decreasing
    from aquila_npu.models.registry import get_model_spec
    from aquila_npu.weights import seeded

    spec = get_model_spec(a.model)
    if max(a.seq_length) > spec.max_position_embeddings:  # rotary positions: nothing learned to run out of
        spec = spec.replace(max_position_embeddings=max(a.seq_length))
    result = {"model": spec.name, "rows": os.path.basename(a.rows), "samples_per_step": a.samples,
              "iters": a.iters, "threads": a.threads, "date": time.strftime("%Y-%m-%d"),
              "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "load_before": os.getloadavg()[0], "by_seq_length": {}}
    with tempfile.TemporaryDirectory(prefix="aquila_pack_bench_") as d:
        data = _preprocess(a.rows, a.tokenizer, os.path.join(d, "alpaca"))
        index = IndexedDataset(data + "_packed_input_ids_document")
        lengths = np.array(index.sequence_lengths)
        seeded.hf_model(spec).save_pretrained(os.path.join(d, "hf"))
        to_megatron(HFReader(os.path.join(d, "hf")), os.path.join(d, "mg"), 1, 1)
        base = os.path.join(d, "mg")
        for seq in a.seq_length:
            positions = instruction_positions(lengths, seq)
            per_pack = len(lengths) / len(best_fit_decreasing(positions, seq))
            packs = max(1, round(a.samples / per_pack))
            padded = _train(a, d, f"padded-{seq}", base, data, a.tokenizer, seq, a.samples, a.micro_batch_size,
                            a.iters, [])
            packed = _train(a, d, f"packed-{seq}", base, data, a.tokenizer, seq, packs, 1,
                            1 + (a.iters - 1) * a.packed_iters_factor, ["--reset-attention-mask"])
            for name, run, pack in (("padded", padded, False), ("packed", packed, True)):
                run["attention_share"] = _attention_share(spec, base, data, a.tokenizer, seq, pack)
            ratio = packed["response_tokens_per_s"] / padded["response_tokens_per_s"]
            result["by_seq_length"][str(seq)] = {"padded": padded, "packed": packed,
                                                 "samples_per_sequence_packed": per_pack,
                                                 "packed_over_padded_response_tokens_per_s": ratio}
            lo = min(packed["response_tokens_per_s_range"]) / max(padded["response_tokens_per_s_range"])
            hi = max(packed["response_tokens_per_s_range"]) / min(padded["response_tokens_per_s_range"])
            result["by_seq_length"][str(seq)]["per_iteration_ratio_range"] = [lo, hi]
            print(f"seq {seq}: padded {padded['response_tokens_per_s']:.0f} response tokens/s "
                  f"(attention {padded['attention_share']:.1%} of a step, peak RSS {padded['peak_rss_gb']:.1f} GB), "
                  f"packed {packed['response_tokens_per_s']:.0f} ({packed['attention_share']:.1%}, "
                  f"{packed['peak_rss_gb']:.1f} GB; {per_pack:.1f} samples per sequence, {packs} sequences per step "
                  f"vs {a.samples}): {ratio:.1f}x (per iteration {lo:.1f}x..{hi:.1f}x)", flush=True)
    result["load_after"] = os.getloadavg()[0]
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
