"""Random kill -9 trials, as a user's crash would come: the figures of docs/faults.md.

    python benchmarks/fault_trials.py [--training 10] [--conversion 5] [--workdir /tmp/aquila_fault_trials]

Training: ``torchrun`` dp2 with the distributed optimizer, saving every iteration; after the third checkpoint all
processes (torchrun and its workers) get SIGKILL at a random moment. Then: does the tracker name a complete
checkpoint (every file read back through ``safe_load``), what was left behind, does the next run remove it and
resume to the same losses as an uninterrupted run, bit for bit.

Conversion: a 170M-parameter LLaMA-shaped model, HF -> Megatron tp2 and Megatron -> HF, with and without an earlier
output at the target; SIGKILL at a random moment while the output is written. Then: is the target absent, untouched
or complete (equal to a clean conversion, file for file), does the rerun succeed and remove the debris.

The deterministic version of these checks (one kill at each step of a save or conversion) runs in the test suite:
tests/test_faults.py.
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from aquila_npu.ports import free_port  # noqa: E402
from aquila_npu.testing.trees import digest, hidden  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=ROOT)
TRAIN = ["--model", "aquila2-tiny", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4",
         "--seq-length", "32", "--lr", "1e-3", "--lr-decay-style", "cosine", "--min-lr", "1e-4",
         "--use-distributed-optimizer", "--log-interval", "1"]


def tree_bytes(paths):
    total = 0
    for p in paths:
        if os.path.isdir(p):
            total += sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(p) for f in fs)
        elif os.path.exists(p):
            total += os.path.getsize(p)
    return total


def losses(path):
    with open(path) as f:
        return [json.loads(line)["lm_loss"] for line in f]


def torchrun(args, log, wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), "-m", "aquila_npu.pretrain", *TRAIN, *map(str, args)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    if wait:
        proc.wait()
    return proc


def descendants(pid):
    """Every process below ``pid`` (from /proc)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def complete(ck):
    """The iteration the tracker names, every file of it read back without error (else raises)."""
    from aquila_npu.checkpoint import safe_load
    from aquila_npu.checkpoint.megatron_io import CheckpointInfo

    info = CheckpointInfo.read(ck)
    d = os.path.join(ck, f"iter_{info.iteration:07d}")
    files = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs]
    assert len(files) == 3, files  # model_optim_rng.pt and two distributed-optimizer shards
    for f in files:
        safe_load.load(f)
    return info.iteration


def training_trials(n, work):
    iters = 40
    straight = os.path.join(work, "straight.jsonl")
    assert torchrun(["--train-iters", iters, "--metrics-file", straight], os.path.join(work, "straight.log")
                    ).returncode == 0
    rows = []
    for t in range(n):
        d = os.path.join(work, f"train-{t}")
        ck = os.path.join(d, "ck")
        os.makedirs(d)
        proc = torchrun(["--train-iters", iters, "--save", ck, "--save-interval", 1],
                        os.path.join(d, "killed.log"), wait=False)
        tracker = os.path.join(ck, "latest_checkpointed_iteration.txt")
        while not (os.path.exists(tracker) and open(tracker).read().strip() not in ("", "1", "2")):
            assert proc.poll() is None, open(os.path.join(d, "killed.log")).read()[-2000:]
            time.sleep(0.01)
        time.sleep(random.uniform(0, 0.6))
        ranks = descendants(proc.pid)  # torchrun starts its workers in sessions of their own
        for pid in [proc.pid, *ranks]:
            os.kill(pid, signal.SIGKILL)
        proc.wait()
        while any(running(pid) for pid in ranks):
            time.sleep(0.01)
        debris = hidden(ck) + hidden(d)
        debris_bytes = tree_bytes([os.path.join(ck, e) for e in hidden(ck)])
        try:
            at = complete(ck)
        except Exception as e:  # noqa: BLE001 (the figure reports it)
            rows.append({"trial": t, "complete": False, "error": str(e)})
            continue
        m = os.path.join(d, "resumed.jsonl")
        rc = torchrun(["--train-iters", iters, "--load", ck, "--save", ck, "--save-interval", 1000,
                       "--metrics-file", m], os.path.join(d, "rerun.log")).returncode
        rows.append({"trial": t, "complete": True, "iteration": at, "debris": debris, "debris_bytes": debris_bytes,
                     "rerun_rc": rc, "exact": rc == 0 and losses(m) == losses(straight)[at:],
                     "left_after_rerun": hidden(ck) + hidden(d)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def medium_hf(path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)


def convert(args, log, wait=True):
    cmd = [sys.executable, os.path.join(ROOT, "tools/checkpoint/convert_ckpt.py"), *map(str, args)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    if wait:
        proc.wait()
    return proc


def conversion_trials(n, work):
    hf = os.path.join(work, "hf")
    medium_hf(hf)
    mg = os.path.join(work, "mg-ref")
    to_mg = lambda dst, *e: ["--loader", "llama2_hf", "--saver", "megatron", "--load-dir", hf,  # noqa: E731
                             "--save-dir", dst, "--target-tensor-parallel-size", 2, *e]
    to_hf = lambda dst, *e: ["--loader", "megatron", "--saver", "megatron", "--save-model-type",  # noqa: E731
                             "save_huggingface_llama", "--load-dir", mg, "--save-dir", dst, *e]
    assert convert(to_mg(mg), os.path.join(work, "ref.log")).returncode == 0
    hf_ref = os.path.join(work, "hf-ref")
    assert convert(to_hf(hf_ref), os.path.join(work, "ref2.log")).returncode == 0
    reference = {"hf2mg": digest(mg), "mg2hg": digest(os.path.join(hf_ref, "mg2hg"))}
    rows = []
    for direction in ("hf2mg", "mg2hg"):
        for existing in (False, True):
            for t in range(n):
                d = os.path.join(work, f"{direction}-{'replace' if existing else 'new'}-{t}")
                out = os.path.join(d, "out")
                os.makedirs(out)
                make = (lambda *e: to_mg(os.path.join(out, "mg"), *e)) if direction == "hf2mg" else \
                    (lambda *e: to_hf(out, *e))
                target = os.path.join(out, "mg" if direction == "hf2mg" else "mg2hg")
                if existing:
                    assert convert(make("--params-dtype", "bf16"), os.path.join(d, "old.log")).returncode == 0
                before = digest(target)
                start = time.monotonic()
                proc = convert(make(), os.path.join(d, "killed.log"), wait=False)
                while not [e for e in hidden(out) if ".tmp." in e] and proc.poll() is None:
                    time.sleep(0.005)
                time.sleep(random.uniform(0, 4.0))
                os.killpg(proc.pid, signal.SIGKILL)
                finished = proc.wait() == 0
                after = digest(target)
                state = ("complete" if after == reference[direction] else "untouched" if after == before
                         else "absent" if after is None else "DAMAGED")
                debris = [e for e in hidden(out) if not e.endswith(".lock")]
                debris_bytes = tree_bytes([os.path.join(out, e) for e in debris])
                rc = convert(make(), os.path.join(d, "rerun.log")).returncode
                rows.append({"case": f"{direction}-{'replace' if existing else 'new'}", "trial": t,
                             "killed_after_s": round(time.monotonic() - start, 2), "finished_first": finished,
                             "target": state, "debris": debris, "debris_bytes": debris_bytes, "rerun_rc": rc,
                             "rerun_complete": digest(target) == reference[direction],
                             "left_after_rerun": hidden(out)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--training", type=int, default=10, help="training trials")
    p.add_argument("--conversion", type=int, default=5, help="trials per conversion case (4 cases)")
    p.add_argument("--workdir", default="/tmp/aquila_fault_trials")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    random.seed(a.seed)
    shutil.rmtree(a.workdir, ignore_errors=True)
    os.makedirs(a.workdir)
    train = training_trials(a.training, a.workdir) if a.training else []
    conv = conversion_trials(a.conversion, a.workdir) if a.conversion else []
    print("\nsummary")
    if train:
        ok = [r for r in train if r["complete"]]
        print(f"training: {len(train)} kills, tracker complete {len(ok)}, debris left by the kill "
              f"{sum(bool(r['debris']) for r in ok)} (up to {max(r['debris_bytes'] for r in ok)} bytes), rerun ok "
              f"{sum(r['rerun_rc'] == 0 for r in ok)}, resume exact {sum(r['exact'] for r in ok)}, debris after "
              f"rerun {sum(bool(r['left_after_rerun']) for r in ok)}")
    if conv:
        print(f"conversion: {len(conv)} kills, target absent/untouched/complete "
              f"{sum(r['target'] != 'DAMAGED' for r in conv)} (damaged {sum(r['target'] == 'DAMAGED' for r in conv)}),"
              f" debris left by the kill {sum(bool(r['debris']) for r in conv)} (up to "
              f"{max(r['debris_bytes'] for r in conv)} bytes), rerun ok {sum(r['rerun_rc'] == 0 for r in conv)}, "
              f"rerun complete {sum(r['rerun_complete'] for r in conv)}, debris after rerun "
              f"{sum(bool(r['left_after_rerun']) for r in conv)}")


if __name__ == "__main__":
    main()
