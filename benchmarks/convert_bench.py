"""Checkpoint conversion throughput and memory, side by side with a plain file copy of the same bytes.

    python benchmarks/convert_bench.py [--model aquila2-7b] [--layers 2] [--dtype bfloat16] [--tp 8] [--pp 1]
                                       [--memory-limit-gb G] [--workdir /tmp/aquila_convert_bench]

Generates a Hugging Face checkpoint with a real model's shapes (default Aquila2-7B: hidden 4096, ffn 11008, 32 heads,
vocab 100008) but fewer layers (2 layers: ~2.4 GB in bf16), then in one run prints: HF -> Megatron tp{tp}-pp{pp}
conversion MB/s, Megatron -> HF MB/s, a plain copy of the same files on the same disk in MB/s, the ratios, and for
each conversion (its own process, sampled every 20 ms from /proc) the peak RSS and the peak anonymous memory
(RssAnon: the process's own memory; the rest of RSS is memory-mapped file pages the kernel can drop), relative to
the checkpoint size, next to the largest single (stage, TP rank) shard.

--memory-limit-gb runs each conversion in a cgroup (v1 memory controller, needs root) capped at that much memory,
page cache included: e.g. ``--model aquila2-34b --layers 4 --tp 8 --pp 2 --memory-limit-gb 3.3`` converts a 9.3 GB
checkpoint under a cap of 35% of its size, the ratio of a 24 GB machine to the 68 GB Aquila2-34B.
"""

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _status_kb(pid, keys):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in keys:
                    out[k] = int(v.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


class MemoryCap:
    """A cgroup-v1 memory cap (page cache included) for child processes; unavailable without root or cgroup v1."""

    ROOT = "/sys/fs/cgroup/memory"

    def __init__(self, limit_bytes):
        self.path = os.path.join(self.ROOT, f"aquila_convert_bench_{os.getpid()}")
        os.makedirs(self.path)
        with open(os.path.join(self.path, "memory.limit_in_bytes"), "w") as f:
            f.write(str(int(limit_bytes)))

    def enter(self):  # runs in the child, before exec
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    def read(self, name):
        with open(os.path.join(self.path, name)) as f:
            return int(f.read())

    def close(self):
        for _ in range(50):
            try:
                os.rmdir(self.path)
                return
            except OSError:
                time.sleep(0.1)


def timed_child(cmd, cap=None):
    """(seconds, peak RSS, peak anonymous RSS) of a command run to completion, sampled from /proc every 20 ms."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=cap.enter if cap else None)
    peak = {"VmHWM": 0, "RssAnon": 0}

    def sample():
        while proc.poll() is None:
            for k, v in _status_kb(proc.pid, ("VmHWM", "RssAnon")).items():
                peak[k] = max(peak[k], v)
            time.sleep(0.02)

    th = threading.Thread(target=sample)
    th.start()
    _, err = proc.communicate()
    th.join()
    elapsed = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    return elapsed, peak["VmHWM"], peak["RssAnon"]


def make_checkpoint(path, model, layers, dtype):
    import torch
    from safetensors.torch import save_file

    from aquila_npu.models.registry import get_model_spec
    from aquila_npu.weights.mapping import hf_shapes

    spec = get_model_spec(model).replace(num_layers=layers, name=f"{model}-{layers}l")
    os.makedirs(path, exist_ok=True)
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    shard, n = {}, 0
    for name, shape in hf_shapes(spec).items():
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
    p.add_argument("--model", default="aquila2-7b", help="registry name whose layer shapes to use")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--memory-limit-gb", type=float, default=None,
                   help="run each conversion under a cgroup memory cap of this size (page cache included)")
    p.add_argument("--workdir", default="/tmp/aquila_convert_bench")
    a = p.parse_args()
    shutil.rmtree(a.workdir, ignore_errors=True)
    hf, mg, back, cp = (os.path.join(a.workdir, x) for x in ("hf", "mg", "back", "copy"))
    print(f"generating {a.model}-shaped checkpoint with {a.layers} layers ({a.dtype}) ...", flush=True)
    make_checkpoint(hf, a.model, a.layers, a.dtype)
    size = dir_bytes(hf)
    mb = size / 1e6
    cap = None
    if a.memory_limit_gb:
        try:
            cap = MemoryCap(a.memory_limit_gb * 1e9)
        except OSError as e:
            raise SystemExit(f"--memory-limit-gb: cannot create a cgroup-v1 memory cap here ({e})")
    tool = [sys.executable, os.path.join(ROOT, "tools/checkpoint/convert_ckpt.py"), "--model-type", "GPT"]
    runs = []

    def convert(label, cmd):
        subprocess.run(["sync"])
        if cap:
            with open(os.path.join(cap.path, "memory.max_usage_in_bytes"), "w") as f:
                f.write("0")
        t, rss, anon = timed_child(cmd, cap)
        t0 = time.perf_counter()
        subprocess.run(["sync"])  # count writing the output to disk, as the copy below does
        t += time.perf_counter() - t0
        runs.append((label, t, rss, anon, cap.read("memory.max_usage_in_bytes") if cap else None))

    try:
        print("converting HF -> Megatron ...", flush=True)
        convert(f"HF -> Megatron tp{a.tp}-pp{a.pp}",
                tool + ["--loader", "llama2_hf", "--saver", "megatron", "--load-dir", hf, "--save-dir", mg,
                        "--target-tensor-parallel-size", str(a.tp), "--target-pipeline-parallel-size", str(a.pp)])
        os.makedirs(back)
        shutil.copy(os.path.join(hf, "config.json"), back)
        print("converting Megatron -> HF ...", flush=True)
        convert(f"Megatron tp{a.tp}-pp{a.pp} -> HF",
                tool + ["--loader", "megatron", "--saver", "megatron", "--save-model-type", "save_huggingface_llama",
                        "--load-dir", mg, "--save-dir", back])
    finally:
        if cap:
            cap.close()
    largest_shard = max(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(mg) for f in fs
                        if f == "model_optim_rng.pt")
    subprocess.run(["sync"])
    t = time.perf_counter()
    shutil.copytree(hf, cp)
    subprocess.run(["sync"])
    t_copy = time.perf_counter() - t
    print(f"checkpoint: {mb:.0f} MB, {a.model} shapes, {a.layers} layers, {a.dtype}; largest (stage, TP rank) shard "
          f"{largest_shard / 1e6:.0f} MB ({largest_shard / size:.2f} of the checkpoint)")
    if cap:
        print(f"each conversion ran under a {a.memory_limit_gb:g} GB cgroup memory cap "
              f"({a.memory_limit_gb * 1e9 / size:.2f} of the checkpoint size, page cache included)")
    head = f"{'step':<30}{'MB/s':>8}{'vs copy':>9}{'peak RSS/size':>15}{'peak anon/size':>16}"
    print(head + (f"{'cgroup peak/size':>18}" if cap else ""))
    print(f"{'plain file copy':<30}{mb / t_copy:>8.0f}{1.0:>9.2f}")
    for label, t, rss, anon, cg in runs:
        line = f"{label:<30}{mb / t:>8.0f}{t_copy / t:>9.2f}{rss / size:>15.2f}{anon / size:>16.2f}"
        print(line + (f"{cg / size:>18.2f}" if cap else ""))
    shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
