"""Generation throughput with megatron-core's static KV cache vs full recompute, in one run.

    python benchmarks/generate_bench.py [--model aquila2-7b --layers 2] [--batch 4] [--prompt-len 128]
                                        [--new-tokens 128] [--dtype bf16] [--device auto]
    torchrun --nproc-per-node 4 benchmarks/generate_bench.py --tp 2 --pp 2 ...

Builds a randomly initialised model with a registry architecture (``--layers`` overrides the depth, so a 7B-shaped
model fits a small machine), then generates ``--new-tokens`` greedy tokens for a batch of random prompts twice with
``aquila_npu.inference.generation.TextGenerator``: with the KV cache (one position per step) and without it (the
whole sequence recomputed every step). Prints generated tokens/s of both, the ratio, and whether both produced the
same tokens (they must: only the amount of work differs). A warm-up run precedes each measurement.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="aquila2-small", help="registry architecture (default aquila2-small: hidden "
                                                             "256, 4 layers, the real 100008-token vocabulary)")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--batch", type=int, default=4, help="prompts per batch")
    p.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16")
    p.add_argument("--device", default="auto", help="auto, npu, cuda or cpu")
    a = p.parse_args()

    import time

    import torch
    from megatron.core import parallel_state as ps

    from aquila_npu.device.setup import setup
    from aquila_npu.inference.generation import GenerationStats, TextGenerator
    from aquila_npu.models.config import transformer_config
    from aquila_npu.models.dtypes import DTYPES
    from aquila_npu.models.gpt import build_model
    from aquila_npu.models.registry import padded_vocab_size
    from aquila_npu.models.registry import get_model_spec
    from aquila_npu.parallel import initialize_model_parallel

    spec = get_model_spec(a.model)
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
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, spec.vocab_size, (a.batch, a.prompt_len), generator=g).tolist()

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
              f"threads {torch.get_num_threads()}; batch {a.batch} x prompt {a.prompt_len} tokens, "
              f"{a.new_tokens} new tokens each")
        for name, s in (("KV cache", s_kv), ("full recompute", s_full)):
            print(f"  {name:15s} {s.generated_tokens} tokens in {s.seconds:7.2f} s ({s.steps} forward steps): "
                  f"{s.tokens_per_second:9.1f} generated tokens/s")
        print(f"  speed-up with the KV cache: {s_kv.tokens_per_second / s_full.tokens_per_second:.2f}x; "
              f"same tokens: {[r.token_ids for r in cached] == [r.token_ids for r in full]}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
