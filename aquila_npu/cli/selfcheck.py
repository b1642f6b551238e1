"""Self-check: our megatron-core Aquila2 model vs Hugging Face LLaMA, logits on the same tokens, on this device; with
``--report``, the first-hour report of a new node (``aquila_npu.checks``).

    python -m aquila_npu.selfcheck                                   # one process, auto-detected device
    torchrun --nproc-per-node 4 -m aquila_npu.selfcheck --tp 2 --pp 2
    torchrun --nproc-per-node 4 -m aquila_npu.selfcheck --tp 4 --device npu --dtype bf16   # fused Ascend kernels
    python -m aquila_npu.selfcheck --device npu --out report.json   # on an NPU node: every check, all devices

Every rank builds the same tiny random HF model (fixed seed), loads its stage through the weight-mapping table,
and the last pipeline stage (TP rank 0) prints the max |ours - HF| (and writes it to --out when given).

``--report`` (run it without torchrun: it starts its own processes) checks each fused op against the plain path
(forward and backward, bf16 and fp16), the collectives for every dtype the code communicates, these logits, a tiny
training run over all devices against a CPU reference shipped with the package, save and resume, and a short
throughput benchmark; it prints one report and writes it to --out as JSON. Exit status 1 when a check failed.
"""

import argparse
import contextlib
import json
import os
import sys

import torch
from megatron.core import parallel_state as ps

from aquila_npu.checkpoint.load_model import build_stage, check_parallel_sizes, load_model_for_inference
from aquila_npu.checkpoint.megatron_io import CheckpointInfo
from aquila_npu.checks.report import CHECKS, device_count, format_report, run_report
from aquila_npu.cli.common import add_device_argument, check_output_file, run_cli
from aquila_npu.device.backends import FusedOps
from aquila_npu.errors import UsageError
from aquila_npu.device.setup import resolve, setup
from aquila_npu.inference.forward import forward_logits
from aquila_npu.models.dtypes import DTYPES
from aquila_npu.parallel import initialize_model_parallel
from aquila_npu.testing import npu_emulator
from aquila_npu.testing.tiny_hf import TINY, tiny_llama
from aquila_npu.weights.mapping import Layout, hf_stage_to_mcore


PROG = "python -m aquila_npu.selfcheck"


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG,
                                description="Compare our model's logits with Hugging Face transformers on this device.")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    add_device_argument(p)
    p.add_argument("--kernels", default=None,
                   help="backend modules when different from the device; 'npu' on a CPU uses the torch_npu emulator "
                        "(tests only)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="parameter dtype (default fp32; with --report bf16 on npu / cuda, fp32 on cpu)")
    p.add_argument("--load", default=None,
                   help="a Megatron checkpoint directory (from convert_ckpt.py) to check instead of a random model; "
                        "its tp/pp must match --tp/--pp; needs --hf-dir")
    p.add_argument("--hf-dir", default=None, help="the Hugging Face model the --load checkpoint was converted from")
    p.add_argument("--out", default=None, help="write the result (or the report) as JSON to this file")
    g = p.add_argument_group("the first-hour report (--report)")
    g.add_argument("--report", action="store_true",
                   help="run every check on this node and print one report (start it without torchrun); the default "
                        "on an Ascend NPU node when started without torchrun and without --load")
    g.add_argument("--logits-only", action="store_true", help="only the logits check, also on an NPU node")
    g.add_argument("--checks", default=",".join(CHECKS),
                   help=f"which checks, comma-separated (default all: {','.join(CHECKS)})")
    g.add_argument("--nproc", type=int, default=None,
                   help="devices to use (default: every device of this node; 1 on cpu)")
    g.add_argument("--workdir", default=None,
                   help="keep every check's logs here (default: a temporary folder, kept only when a check fails)")
    g.add_argument("--timeout", type=float, default=1800, help="seconds allowed per check process (default 1800)")
    g.add_argument("--comm-size-mb", type=float, default=64.0,
                   help="message size of the all-reduce bandwidth measurement (default 64 MiB)")
    a = p.parse_args(argv)
    if a.report and a.logits_only:
        raise UsageError("--report and --logits-only exclude each other")
    first_hour = not (a.logits_only or a.load or "RANK" in os.environ) and resolve(a.device) == "npu"
    if a.report or first_hour:  # what an operator runs first on an Atlas node: python -m aquila_npu.selfcheck
        return _report(a)
    a.dtype = a.dtype or "fp32"
    if bool(a.load) != bool(a.hf_dir):
        raise UsageError("--load and --hf-dir go together")
    info = CheckpointInfo.read(a.load) if a.load else None
    if info is not None:
        check_parallel_sizes(info, a.tp, a.pp)
    torch.set_num_threads(1)
    dtype = DTYPES[a.dtype]
    emulate = a.kernels == "npu" and a.device != "npu"
    with npu_emulator.installed() if emulate else contextlib.nullcontext() as fake_npu:
        # Fused kernels wherever the kernels are Ascend's (real or emulated); plain modules elsewhere.
        fused = FusedOps.all() if "npu" in (a.kernels, resolve(a.device)) else FusedOps()
        if a.load:
            # Before setup(): transformers' from_pretrained builds non-persistent buffers (rotary inv_freq) wrongly
            # under the CPU redirection of torch.cuda / tensor factories.
            from transformers import AutoModelForCausalLM

            hf_reference = AutoModelForCausalLM.from_pretrained(a.hf_dir, dtype=dtype).eval()
        dev = setup(a.device, fused, kernels=a.kernels)
        if info is not None:
            loaded = load_model_for_inference(info, dev, params_dtype=dtype)
            model, spec = loaded.model, loaded.spec
            hf = hf_reference.to(dev.torch_device)
        else:
            initialize_model_parallel(a.tp, a.pp)
            pp_rank, tp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
            hf = tiny_llama(dtype=dtype).to(dev.torch_device)
            spec, layout = TINY, Layout(TINY, a.tp, a.pp, make_vocab_size_divisible_by=8)
            shard = hf_stage_to_mcore(hf.state_dict().__getitem__, layout, pp_rank)[tp_rank]
            model, _ = build_stage(spec, layout, dev, shard, params_dtype=dtype, pp_rank=pp_rank)
        torch.manual_seed(1)
        tokens = torch.randint(3, spec.vocab_size, (2, 24), device=dev.torch_device)
        logits = forward_logits(model, tokens)
        if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
            with torch.no_grad():
                ref = hf(tokens).logits.float()
            ours = logits.float()
            ours = ours[..., : spec.vocab_size]
            result = {"max_abs_diff": (ours - ref).abs().max().item(),
                      "ref_abs_max": ref.abs().max().item(), "padded_vocab": logits.shape[-1],
                      "argmax_agree": (ours.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                      "tp": a.tp, "pp": a.pp, "kernels": dev.kernels, "dtype": a.dtype,
                      "emulated_npu_calls": dict(fake_npu.calls) if fake_npu is not None else {}}
            result["tolerance"] = 1e-4 if a.dtype == "fp32" else 2e-2
            result["ok"] = ok = result["max_abs_diff"] < result["tolerance"]
            if a.out:
                with open(a.out, "w") as f:
                    json.dump(result, f)
            print(f"aquila_npu selfcheck on {dev.name} (kernels {dev.kernels}), tp{a.tp}-pp{a.pp} {a.dtype}: "
                  f"max |logits - HF| = {result['max_abs_diff']:.3g} -> {'OK' if ok else 'MISMATCH'}")
            print(json.dumps(result))
    return 0


def _report(a) -> int:
    checks = [c.strip() for c in a.checks.split(",") if c.strip()]
    unknown = [c for c in checks if c not in CHECKS]
    if unknown or not checks:
        raise UsageError(f"--checks {a.checks}: choose from {', '.join(CHECKS)}")
    if "RANK" in os.environ:
        raise UsageError("--report starts its own processes: run it with python -m, not under torchrun")
    check_output_file("--out", a.out)
    device = resolve(a.device)
    nproc = a.nproc or device_count(device)
    if nproc < 1:
        raise UsageError(f"--nproc {nproc} must be >= 1")
    dtype = a.dtype or ("fp32" if device == "cpu" else "bf16")
    report = run_report(device, nproc=nproc, dtype=dtype, checks=checks, workdir=a.workdir, timeout=a.timeout,
                        comm_size_mb=a.comm_size_mb)
    print(format_report(report))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
        print(f"wrote {a.out}")
    return 0 if report["passed"] else 1


def main(argv=None) -> int:
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
