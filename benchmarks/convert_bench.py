"""Checkpoint conversion throughput and memory, side by side with a plain file copy of the same bytes.

    python benchmarks/convert_bench.py [--layers 2] [--dtype bf16] [--tp 8] [--workdir /tmp/aquila_convert_bench]

Generates a Hugging Face checkpoint with the real Aquila2-7B shapes (hidden 4096, ffn 11008, 32 heads, vocab 100008)
but fewer layers (2 layers: ~2.4 GB in bf16), then in one run prints: HF -> Megatron tp{tp}-pp1 conversion MB/s,
Megatron -> HF MB/s, a plain copy of the same files on the same disk in MB/s, the ratios, and each conversion's peak
RSS relative to the checkpoint size (each conversion runs in its own process so its peak RSS is its own).
"""

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def timed_child(cmd):
    """(seconds, peak RSS bytes of the child) for a command run to completion."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        print("warning: peak RSS of this child not above an earlier child's; reported figure is an upper bound")
    return elapsed, peak * 1024


def make_checkpoint(path, layers, dtype):
    import torch
    from safetensors.torch import save_file

    from aquila_npu.models.registry import get_model_spec
    from aquila_npu.weights.mapping import hf_names

    spec = get_model_spec("aquila2-7b").replace(num_layers=layers, name=f"aquila2-7b-{layers}l")
    os.makedirs(path, exist_ok=True)
    dt = getattr(torch, dtype)
    h, f, v = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    shapes = {"embed_tokens": (v, h), "lm_head": (v, h), "q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h),
              "o_proj": (h, h), "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
    g = torch.Generator().manual_seed(0)
    shard, n = {}, 0
    for name in hf_names(spec):
        key = name.split(".")[-2]
        shape = shapes.get(key, (h,))
        shard[name] = (torch.randn(shape, generator=g) * 0.02).to(dt)
        if sum(t.numel() * t.element_size() for t in shard.values()) > 1 << 30:
            n += 1
            save_file(shard, os.path.join(path, f"part-{n}.safetensors"))
            shard = {}
    if shard:
        n += 1
        save_file(shard, os.path.join(path, f"part-{n}.safetensors"))
    # an index, as sharded HF checkpoints have
    import json
    from safetensors import safe_open
    wm = {}
    for i in range(1, n + 1):
        with safe_open(os.path.join(path, f"part-{i}.safetensors"), framework="pt") as fh:
            wm.update({k: f"part-{i}.safetensors" for k in fh.keys()})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": wm}, fh)
    cfg = spec.to_hf_config()
    cfg["torch_dtype"] = dtype
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--workdir", default="/tmp/aquila_convert_bench")
    a = p.parse_args()
    shutil.rmtree(a.workdir, ignore_errors=True)
    hf, mg, back, cp = (os.path.join(a.workdir, x) for x in ("hf", "mg", "back", "copy"))
    print(f"generating Aquila2-7B-shaped checkpoint with {a.layers} layers ({a.dtype}) ...")
    make_checkpoint(hf, a.layers, a.dtype)
    size = dir_bytes(hf)
    mb = size / 1e6
    tool = [sys.executable, os.path.join(ROOT, "tools/checkpoint/convert_ckpt.py"), "--model-type", "GPT"]
    t_in, rss_in = timed_child(tool + ["--loader", "llama2_hf", "--saver", "megatron", "--load-dir", hf,
                                       "--save-dir", mg, "--target-tensor-parallel-size", str(a.tp)])
    os.makedirs(back)
    shutil.copy(os.path.join(hf, "config.json"), back)
    t_out, rss_out = timed_child(tool + ["--loader", "megatron", "--saver", "megatron", "--save-model-type",
                                         "save_huggingface_llama", "--load-dir", mg, "--save-dir", back])
    subprocess.run(["sync"])
    t = time.perf_counter()
    shutil.copytree(hf, cp)
    subprocess.run(["sync"])
    t_copy = time.perf_counter() - t
    print(f"checkpoint: {mb:.0f} MB, Aquila2-7B shapes, {a.layers} layers, {a.dtype}")
    print(f"{'step':<32}{'MB/s':>10}{'vs copy':>10}{'peak RSS / size':>18}")
    print(f"{'plain file copy':<32}{mb / t_copy:>10.0f}{1.0:>10.2f}{'':>18}")
    print(f"{f'HF -> Megatron tp{a.tp}-pp1':<32}{mb / t_in:>10.0f}{t_copy / t_in:>10.2f}{rss_in / size:>18.2f}")
    print(f"{f'Megatron tp{a.tp}-pp1 -> HF':<32}{mb / t_out:>10.0f}{t_copy / t_out:>10.2f}{rss_out / size:>18.2f}")
    shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
