"""Generation throughput, measured side by side in one run.

Two modes:

* ``--vs-hf``: ours against Hugging Face transformers' ``generate`` on the same weights, prompts and machine:

      python benchmarks/generate_bench.py --vs-hf [--model smollm-135m tinyllama-1.1b] [--batch 1 8] [--layouts 1x1 1x2]
      python benchmarks/generate_bench.py --vs-hf --hf-dir ./model_from_hf/SOME-MODEL --layouts 1x1 2x1

  A shape (``--model``: ``aquila_npu.benchmarking.side_by_side.BENCH_SHAPES`` or the model registry) becomes a random
  ``LlamaForCausalLM`` saved as a HF folder (or ``--hf-dir`` names one), and our converter writes a Megatron
  checkpoint of it for each ``--layouts`` TPxPP. Each side runs in its own process (HF's ``from_pretrained`` must not
  share a process with our CPU set-up; see DEVELOPERS.md): it loads the model, warms up, then times greedy decoding
  of ``--new-tokens`` tokens for each ``--batch`` (random prompts of different lengths, so padding is real: the
  longest has ``--prompt-len`` tokens, the shortest half of that). HF gets left padding and an attention mask;
  neither side stops early (no EOS). Start-up (imports, loading) is outside the timed region. The sides alternate
  for ``--rounds`` rounds (the machine may be shared); the ratio of each round is printed as a range over the rounds,
  the best and median rounds beside it, with the load average. Several ``--model`` shapes run one comparison each
  (default: the 135M shape, whose vocabulary is a third of the model, and TinyLlama-1.1B's, a real checkpoint's shape
  with its own vocabulary; ``--out X.json`` then writes ``X-<shape>.json``). Prints tokens/s of both, the ratio, and whether the generated tokens are the same.
  Two-process layouts run under torchrun with one thread per process; one-process runs use torch's default threads
  (one per core) on both sides, or ``--threads``. A layout the shape cannot be split into (heads or layers not divisible) is listed with the reason.

* default: our static KV cache vs full recompute (``use_kv_cache=False``) on a registry architecture:

      python benchmarks/generate_bench.py [--model aquila2-7b --layers 2] [--batch 4] [--prompt-len 128]
      torchrun --nproc-per-node 4 benchmarks/generate_bench.py --tp 2 --pp 2 ...
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from aquila_npu.benchmarking.side_by_side import (alternate, get_shape, print_result, ratio_range,  # noqa: E402
                                                  shape_out,
                                                  random_hf_model, save_result, worker_env)

WARMUP_TOKENS = 4


def prompt_lengths(batch, longest):
    """Different lengths from ``longest`` down to about half of it (one prompt: ``longest``)."""
    return [longest - (i * longest) // (2 * batch) for i in range(batch)]


def make_prompts(batches, longest, vocab, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return {str(b): [torch.randint(3, vocab, (n,), generator=g).tolist() for n in prompt_lengths(b, longest)]
            for b in batches}


# ---------------------------------------------------------------------------------------------------- workers
def worker_hf(a):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(a.hf_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # no early stop: every row generates --new-tokens
    pad = 0
    out = {}
    for b, prompts in json.load(open(a.prompts)).items():
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

        def run(n):
            t0 = time.perf_counter()
            with torch.inference_mode():
                gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                     min_new_tokens=n, pad_token_id=pad)
            return time.perf_counter() - t0, gen[:, width:].tolist()

        run(WARMUP_TOKENS)
        times, tokens = [], None
        for _ in range(a.repeats):
            dt, tokens = run(a.new_tokens)
            times.append(dt)
        out[b] = {"seconds": times, "tokens": tokens}
    print_result(out)


def worker_ours(a):
    import torch

    from aquila_npu.checkpoint.load_model import load_model_for_inference
    from aquila_npu.checkpoint.megatron_io import CheckpointInfo
    from aquila_npu.device.setup import setup
    from aquila_npu.inference.generation import GenerationStats, TextGenerator

    dev = setup("cpu")
    gen = TextGenerator.from_loaded(load_model_for_inference(CheckpointInfo.read(a.load), dev), dev.torch_device)
    out = {}
    for b, prompts in json.load(open(a.prompts)).items():
        gen.generate(prompts, WARMUP_TOKENS)
        times, tokens = [], None
        for _ in range(a.repeats):
            stats = GenerationStats()
            t0 = time.perf_counter()
            res = gen.generate(prompts, a.new_tokens, stats=stats)
            times.append(time.perf_counter() - t0)
            tokens = [r.token_ids for r in res]
        out[b] = {"seconds": times, "tokens": tokens}
    if torch.distributed.get_rank() == 0:
        print_result(out)
    torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------------- side by side
def vs_hf(a):
    import torch

    from aquila_npu.benchmarking.environment import cpu_model
    from aquila_npu.checkpoint.convert import to_megatron
    from aquila_npu.checkpoint.hf_io import HFReader
    from aquila_npu.errors import LayoutError
    from aquila_npu.ports import free_port
    from aquila_npu.weights.mapping import Layout

    work = a.work_dir or tempfile.mkdtemp(prefix="generate_bench-")
    os.makedirs(work, exist_ok=True)
    hf_dir = a.hf_dir
    if hf_dir is None:
        spec = get_shape(a.model)
        hf_dir = random_hf_model(spec.replace(num_layers=a.layers) if a.layers else spec, os.path.join(work, "hf"))
    spec = HFReader(hf_dir).spec
    layouts, skipped = [], []
    for text in a.layouts:
        tp, pp = map(int, text.lower().split("x"))
        try:
            Layout(spec, tp, pp)
        except LayoutError as e:
            skipped.append(f"tp{tp}-pp{pp}: {e}")
            continue
        mg = os.path.join(work, f"mg-tp{tp}-pp{pp}")
        if not os.path.isdir(mg):
            to_megatron(HFReader(hf_dir), mg, tp, pp)
        layouts.append((tp, pp, mg))
    prompts = os.path.join(work, "prompts.json")
    with open(prompts, "w") as f:
        json.dump(make_prompts(a.batch, a.prompt_len, spec.vocab_size), f)

    me = os.path.abspath(__file__)
    common = ["--prompts", prompts, "--new-tokens", str(a.new_tokens), "--repeats", str(a.repeats)]
    env, one_thread = worker_env(ROOT, a.threads), worker_env(ROOT, 1)
    sides = {"HF transformers": ([sys.executable, me, "--worker", "hf", "--hf-dir", hf_dir, *common], env)}
    for tp, pp, mg in layouts:
        if tp * pp == 1:
            cmd, e = [sys.executable, me], env
        else:
            cmd, e = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tp * pp),
                      "--master-port", str(free_port()), me], one_thread
        sides[f"ours tp{tp}-pp{pp}"] = (cmd + ["--worker", "ours", "--load", mg, *common], e)
    runs, loads = alternate(sides, a.rounds)

    header = (f"generate_bench --vs-hf: {a.hf_dir or a.model} ({spec.num_layers} layers, hidden {spec.hidden_size}, "
              f"{spec.num_attention_heads}/{spec.num_key_value_heads} heads, FFN {spec.intermediate_size}, vocab "
              f"{spec.vocab_size}), fp32, greedy, {a.new_tokens} new tokens, prompts of {a.prompt_len // 2}.."
              f"{a.prompt_len} tokens; {cpu_model()}, {os.cpu_count()} cores, torch threads "
              f"{a.threads or torch.get_num_threads()} (1 per process for 2+ processes); {a.rounds} round(s) x "
              f"{a.repeats} timed run(s), sides alternating; load average (1 min) {min(loads):.1f}..{max(loads):.1f} "
              f"during the run; {time.strftime('%Y-%m-%d %H:%M')}")
    print(header)
    result = {"benchmark": "generate_bench --vs-hf", "summary": header, "model": a.hf_dir or a.model,
              "new_tokens": a.new_tokens, "prompt_len": a.prompt_len, "rounds": a.rounds, "repeats": a.repeats,
              "load_average": loads, "skipped": skipped, "batches": {}}
    for text in skipped:
        print(f"  skipped {text}")
    hf_name = "HF transformers"
    for b in map(str, a.batch):
        ref = runs[hf_name][0][b]["tokens"]
        n_tokens = len(ref) * a.new_tokens
        best = {name: n_tokens / min(t for r in rs for t in r[b]["seconds"]) for name, rs in runs.items()}
        med = {name: n_tokens / statistics.median(t for r in rs for t in r[b]["seconds"]) for name, rs in runs.items()}
        print(f"  batch {b}:")
        result["batches"][b] = {}
        for name in runs:
            same = all(r[b]["tokens"] == ref for r in runs[name])
            per_round = [min(rh[b]["seconds"]) / min(r[b]["seconds"]) for r, rh in zip(runs[name], runs[hf_name])]
            result["batches"][b][name] = {"tokens_per_s_best": best[name], "tokens_per_s_median": med[name],
                                          "ratio_vs_hf_best": best[name] / best[hf_name],
                                          "ratio_vs_hf_median": med[name] / med[hf_name], "same_tokens_as_hf": same,
                                          "ratio_vs_hf_per_round": per_round,
                                          "seconds": [r[b]["seconds"] for r in runs[name]]}
            ratio = "" if name == hf_name else (f"  {ratio_range(per_round)} HF over the rounds (best "
                                                f"{best[name] / best[hf_name]:.2f}x, median "
                                                f"{med[name] / med[hf_name]:.2f}x)")
            print(f"    {name:18s} {best[name]:8.1f} tokens/s (median {med[name]:8.1f}){ratio}"
                  + ("" if name == hf_name else f"; same tokens as HF: {same}"))
    save_result(a.out, result)


def kv_vs_recompute(a):
    import torch
    from megatron.core import parallel_state as ps

    from aquila_npu.device.setup import setup
    from aquila_npu.inference.generation import GenerationStats, TextGenerator
    from aquila_npu.models.config import transformer_config
    from aquila_npu.models.dtypes import DTYPES
    from aquila_npu.models.gpt import build_model
    from aquila_npu.models.registry import padded_vocab_size
    from aquila_npu.parallel import initialize_model_parallel

    spec = get_shape(a.model)
    if a.layers:
        spec = spec.replace(num_layers=a.layers)
    dtype = DTYPES[a.dtype]
    dev = setup(a.device)
    initialize_model_parallel(a.tp, a.pp)
    pp_rank = ps.get_pipeline_model_parallel_rank()
    cfg = transformer_config(spec, tensor_parallel=a.tp, pipeline_parallel=a.pp, params_dtype=dtype,
                             **dev.backend.config_overrides())
    padded = padded_vocab_size(spec.vocab_size, 1, a.tp)
    model = build_model(spec, cfg, dev.backend, padded_vocab=padded, pre_process=pp_rank == 0,
                        post_process=pp_rank == a.pp - 1, pp_rank=pp_rank, parallel_output=False)
    model = model.to(dev.torch_device).eval()
    gen = TextGenerator(model, hidden_size=spec.hidden_size, params_dtype=dtype, vocab_size=spec.vocab_size,
                        padded_vocab=padded, max_sequence_length=a.prompt_len + a.new_tokens,
                        device=dev.torch_device)
    batch = a.batch[0]
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, spec.vocab_size, (batch, a.prompt_len), generator=g).tolist()

    def run(kv):
        gen.generate([x[:8] for x in prompts], 4, use_kv_cache=kv)  # warm-up
        if dev.name == "cuda":
            torch.cuda.synchronize()
        stats = GenerationStats()
        t0 = time.perf_counter()
        out = gen.generate(prompts, a.new_tokens, use_kv_cache=kv, stats=stats)
        if dev.name == "cuda":
            torch.cuda.synchronize()
        stats.seconds = time.perf_counter() - t0
        return out, stats

    cached, s_kv = run(True)
    full, s_full = run(False)
    if torch.distributed.get_rank() == 0:
        n = sum(p.numel() for p in model.parameters())
        print(f"generate_bench: {spec.name} ({spec.num_layers} layers, hidden {spec.hidden_size}, vocab {spec.vocab_size}, "
              f"{n / 1e6:.1f}M parameters on rank 0), {a.dtype}, tp{a.tp}-pp{a.pp} on {dev.name}, "
              f"threads {torch.get_num_threads()}; batch {batch} x prompt {a.prompt_len} tokens, "
              f"{a.new_tokens} new tokens each")
        for name, s in (("KV cache", s_kv), ("full recompute", s_full)):
            print(f"  {name:15s} {s.generated_tokens} tokens in {s.seconds:7.2f} s ({s.steps} forward steps): "
                  f"{s.tokens_per_second:9.1f} generated tokens/s")
        print(f"  speed-up with the KV cache: {s_kv.tokens_per_second / s_full.tokens_per_second:.2f}x; "
              f"same tokens: {[r.token_ids for r in cached] == [r.token_ids for r in full]}")
    torch.distributed.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--vs-hf", action="store_true", help="side by side with transformers' generate")
    p.add_argument("--model", default=None, nargs="+",
                   help="architecture: a benchmarking.side_by_side.BENCH_SHAPES name (smollm-135m, tinyllama-1.1b) or "
                        "a registry name; --vs-hf takes several, one comparison each (default: smollm-135m "
                        "tinyllama-1.1b with --vs-hf, aquila2-small otherwise)")
    p.add_argument("--hf-dir", default=None, help="--vs-hf: a Hugging Face model folder instead of random weights")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="prompts per batch (--vs-hf: several sizes, default 1 8; otherwise one, default 4)")
    p.add_argument("--prompt-len", type=int, default=None,
                   help="tokens per prompt (--vs-hf: the longest; default 64 with --vs-hf, 128 otherwise)")
    p.add_argument("--new-tokens", type=int, default=None,
                   help="tokens generated per prompt (default 64 with --vs-hf, 128 otherwise)")
    p.add_argument("--layouts", nargs="+", default=["1x1", "2x1", "1x2"],
                   help="--vs-hf: our tensor x pipeline parallel layouts (processes = tp x pp)")
    p.add_argument("--rounds", type=int, default=3, help="--vs-hf: alternating rounds of every side")
    p.add_argument("--repeats", type=int, default=1, help="--vs-hf: timed runs per batch in each round")
    p.add_argument("--work-dir", default=None, help="--vs-hf: where models and checkpoints go (default: a new "
                                                    "temporary folder)")
    p.add_argument("--threads", type=int, default=None,
                   help="--vs-hf: torch threads of one-process runs, both sides (default: torch's, one per core)")
    p.add_argument("--out", default=None, help="--vs-hf: also write the result as JSON here "
                                               "(benchmarks/results/generate-vs-hf-*.json)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (KV-cache mode)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (KV-cache mode)")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16 (KV-cache mode)")
    p.add_argument("--device", default="auto", help="auto, npu, cuda or cpu (KV-cache mode)")
    p.add_argument("--worker", choices=["hf", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--load", help=argparse.SUPPRESS)
    p.add_argument("--prompts", help=argparse.SUPPRESS)
    a = p.parse_args()
    side_by_side = a.vs_hf or a.worker
    shapes = a.model or (["smollm-135m", "tinyllama-1.1b"] if a.vs_hf and not a.hf_dir else
                         ["smollm-135m"] if side_by_side else ["aquila2-small"])
    a.model = shapes[0]
    a.batch = a.batch or ([1, 8] if side_by_side else [4])
    a.prompt_len = a.prompt_len or (64 if side_by_side else 128)
    a.new_tokens = a.new_tokens or (64 if side_by_side else 128)
    if a.worker == "hf":
        worker_hf(a)
    elif a.worker == "ours":
        worker_ours(a)
    elif a.vs_hf:
        for shape in shapes:  # one comparison per shape (issue 28: a real model's vocabulary proportion too)
            vs_hf(argparse.Namespace(**dict(vars(a), model=shape, out=shape_out(a.out, shape, len(shapes) > 1),
                                            work_dir=a.work_dir and os.path.join(a.work_dir, shape))))
    else:
        kv_vs_recompute(a)


if __name__ == "__main__":
    main()
