"""A tiny training run on this node (tensor parallelism over all its devices) whose losses must match a CPU
reference shipped with the package (``reference.json``), then a save at iteration 3 and a resume that must repeat
iterations 4-6 bit for bit.

The model (the registry's ``aquila2-tiny-tp8``) starts from the seeded weights of ``aquila_npu.weights.seeded``
(numpy's legacy generator: they depend on the seed alone, never on torch's or transformers' initialisation), converted
with a vocabulary padded to 1024 whatever the tp (1, 2, 4 or 8), so every layout computes the same losses; the data
are aquila_npu.pretrain's ``--mock-data`` tokens. The reference is the same run on the CPU in fp32, one process:

    python -m aquila_npu.checks.training        # rewrites aquila_npu/checks/reference.json

It records what it was made from (``inputs``: the model's shape, the seed and scale, the vocabulary padding, the
flags and the sha256 of the weights); the check compares that with what this code would use and refuses a stale
reference in one line (``StaleReference``) instead of comparing against numbers of another model.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from typing import Optional

from aquila_npu.errors import BenchmarkFailed, StaleReference
from aquila_npu.models.registry import get_model_spec
from aquila_npu.outputs.files import write_json, write_text

MODEL = "aquila2-tiny-tp8"
SPEC = get_model_spec(MODEL)
DIVISIBLE_BY = 128  # 1000 -> 1024 at tp 1, 2, 4 and 8: the same padded vocabulary, so the same losses
WEIGHTS_SEED = 0
WEIGHT_SCALE = 5.0  # the usual std (0.02) x 5: far from uniform logits, so the losses depend on every op's result
ITERS, SAVE_AT = 6, 3
TP_SIZES = (1, 2, 4, 8)
FLAGS = ["--mock-data", "--seq-length", 64, "--micro-batch-size", 2, "--global-batch-size", 4, "--lr", 1e-3,
         "--lr-decay-style", "constant", "--clip-grad", 1.0, "--log-interval", 1, "--eval-interval", 1000,
         "--seed", 1234, "--train-iters", ITERS]
# max |loss - reference| / reference per iteration. fp32: different kernels and reduction orders; bf16 / fp16: the
# dtype's rounding through 6 iterations (the CPU's own bf16 run differs from its fp32 one by ~3e-3, see
# reference.json).
TOLERANCE = {"fp32": 1e-3, "bf16": 2e-2, "fp16": 1e-2}
REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference.json")


def pick_tp(nproc: int) -> int:
    if nproc not in TP_SIZES:
        raise ValueError(f"the training check runs tensor parallelism over all devices: {nproc} devices is not one "
                         f"of {', '.join(map(str, TP_SIZES))}")
    return nproc


def weights():
    """The seeded Hugging Face weights the check starts from."""
    from aquila_npu.weights import seeded

    return seeded.hf_weights(SPEC, WEIGHTS_SEED, std=seeded.STD * WEIGHT_SCALE)


def inputs() -> dict:
    """What a reference is made from, as this code would make it (compared with ``reference.json``'s)."""
    from aquila_npu.weights import seeded

    return {"model": {k: getattr(SPEC, k) for k in ("name", "hidden_size", "intermediate_size", "num_layers",
                                                    "num_attention_heads", "num_key_value_heads", "vocab_size")},
            "weights_seed": WEIGHTS_SEED, "weight_scale": WEIGHT_SCALE, "make_vocab_size_divisible_by": DIVISIBLE_BY,
            "flags": [str(a) for a in FLAGS], "weights_sha256": seeded.digest(weights())}


def load_reference(path: str = REFERENCE) -> dict:
    """The shipped reference, refused in one line when it was made from other inputs than this code uses."""
    with open(path) as f:
        reference = json.load(f)
    have, want = reference.get("inputs"), inputs()
    if have != want:
        diff = sorted(k for k in want if (have or {}).get(k) != want[k])
        raise StaleReference(f"{path}: made from other inputs than this code uses ({', '.join(diff)} differ): "
                             "regenerate it with python -m aquila_npu.checks.training")
    return reference


def build_checkpoint(workdir: str, tp: int) -> str:
    """The seeded weights as a Megatron checkpoint for ``tp``."""
    from safetensors.torch import save_file

    from aquila_npu.checkpoint.convert import to_megatron
    from aquila_npu.checkpoint.hf_io import HFReader

    hf = os.path.join(workdir, "hf")
    if not os.path.exists(os.path.join(hf, "config.json")):
        os.makedirs(hf, exist_ok=True)
        save_file(weights(), os.path.join(hf, "model.safetensors"))
        write_json(os.path.join(hf, "config.json"), SPEC.to_hf_config(), "config.json", indent=2)
    out = os.path.join(workdir, f"mg-tp{tp}")
    if not os.path.isdir(out):
        to_megatron(HFReader(hf), out, tp, 1, make_vocab_size_divisible_by=DIVISIBLE_BY)
    return out


def curves(metrics_file: str) -> dict:
    """Per-iteration losses and gradient norms of a --metrics-file."""
    from aquila_npu.benchmarking.run import read_metrics

    records = read_metrics(metrics_file)
    return {"losses": [r["lm_loss"] for r in records], "grad_norms": [r["grad_norm"] for r in records]}


def max_rel_err(run: dict, reference: dict) -> float:
    """Largest relative difference of the losses and gradient norms, iteration by iteration."""
    pairs = [p for key in ("losses", "grad_norms") for p in zip(run[key], reference[key])]
    return max(abs(a - b) / abs(b) for a, b in pairs)


def _train(tag: str, workdir: str, device: str, nproc: int, dtype: str, load: str, timeout: Optional[float],
           extra=()) -> dict:
    from aquila_npu.launch import launch_command, run_logged

    metrics = os.path.join(workdir, f"{tag}.jsonl")
    argv = [str(a) for a in [*FLAGS, "--load", load, "--device", device, "--tensor-model-parallel-size", nproc,
                             "--metrics-file", metrics, *([f"--{dtype}"] if dtype != "fp32" else []), *extra]]
    if device == "npu":
        from aquila_npu.device.fused import FusedOps

        argv += FusedOps.all().requested()
    cmd = launch_command(nproc, argv)
    log = os.path.join(workdir, f"{tag}.log")
    if run_logged(cmd, log, timeout) != 0:
        raise BenchmarkFailed(f"the {tag} run failed; log: {log}")
    return curves(metrics)


def run(device: str, nproc: int, dtype: str, workdir: str, timeout: Optional[float] = None) -> dict:
    """Train ``ITERS`` iterations at tp = ``nproc`` (saving at ``SAVE_AT``), resume from the save; compare with the
    reference. Fused kernels on npu."""
    tp = pick_tp(nproc)
    reference = load_reference()
    load = build_checkpoint(workdir, tp)
    ck = os.path.join(workdir, "ck")
    straight = _train("train", workdir, device, nproc, dtype, load, timeout,
                      ["--save", ck, "--save-interval", SAVE_AT])
    # resume from the middle (the end was saved too)
    write_text(os.path.join(ck, "latest_checkpointed_iteration.txt"), str(SAVE_AT), "the tracker file")
    resumed = _train("resume", workdir, device, nproc, dtype, ck, timeout)
    training = {"tp": tp, "dtype": dtype, **straight, "reference": {k: reference[k] for k in straight},
                "max_rel_err": max_rel_err(straight, reference), "tolerance": TOLERANCE[dtype]}
    training["ok"] = len(straight["losses"]) == ITERS and training["max_rel_err"] <= TOLERANCE[dtype]
    resume = {"saved_at": SAVE_AT, "straight": {k: v[SAVE_AT:] for k, v in straight.items()}, "resumed": resumed}
    resume["ok"] = resume["resumed"] == resume["straight"]
    return {"training": training, "resume": resume}


def make_reference(path: str = REFERENCE) -> dict:
    """Run the check on the CPU, one process, fp32 (and bf16 for the record) and write the reference."""
    import tempfile

    import torch

    record = {"how": "python -m aquila_npu.checks.training: aquila_npu.pretrain on the CPU, 1 process, tp1, "
                     "fp32, from the seeded weights of 'inputs'",
              "inputs": inputs(), "software": {"python": platform.python_version(), "torch": torch.__version__}}
    with tempfile.TemporaryDirectory() as tmp:
        load = build_checkpoint(tmp, 1)
        record.update(_train("fp32", tmp, "cpu", 1, "fp32", load, None))
        record["cpu_bf16"] = _train("bf16", tmp, "cpu", 1, "bf16", load, None)
    record["cpu_bf16_max_rel_err"] = max_rel_err(record["cpu_bf16"], record)
    write_json(path, record, "the training reference", indent=1)
    return record


if __name__ == "__main__":
    print(json.dumps(make_reference(sys.argv[1] if len(sys.argv) > 1 else REFERENCE), indent=1))
