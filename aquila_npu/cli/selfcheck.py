"""Self-check: our megatron-core Aquila2 model vs Hugging Face LLaMA, logits on the same tokens, on this device.

    python -m aquila_npu.selfcheck                                   # one process, auto-detected device
    torchrun --nproc-per-node 4 -m aquila_npu.selfcheck --tp 2 --pp 2
    torchrun --nproc-per-node 8 -m aquila_npu.selfcheck --tp 8 --device npu --dtype bf16   # fused Ascend kernels

Every rank builds the same tiny random HF model (fixed seed), loads its stage through the weight-mapping table,
and the last pipeline stage (TP rank 0) prints the max |ours - HF| (and writes it to --out when given).
"""

import argparse
import contextlib
import json
import sys

import torch
from megatron.core import parallel_state as ps

from aquila_npu.checkpoint.load_model import build_stage, check_parallel_sizes, load_model_for_inference
from aquila_npu.checkpoint.megatron_io import CheckpointInfo
from aquila_npu.cli.common import add_device_argument, run_cli
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
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="parameter dtype (default fp32)")
    p.add_argument("--load", default=None,
                   help="a Megatron checkpoint directory (from convert_ckpt.py) to check instead of a random model; "
                        "its tp/pp must match --tp/--pp; needs --hf-dir")
    p.add_argument("--hf-dir", default=None, help="the Hugging Face model the --load checkpoint was converted from")
    p.add_argument("--out", default=None, help="write the result as JSON to this file")
    a = p.parse_args(argv)
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
            if a.out:
                with open(a.out, "w") as f:
                    json.dump(result, f)
            ok = result["max_abs_diff"] < (1e-4 if a.dtype == "fp32" else 2e-2)
            print(f"aquila_npu selfcheck on {dev.name} (kernels {dev.kernels}), tp{a.tp}-pp{a.pp} {a.dtype}: "
                  f"max |logits - HF| = {result['max_abs_diff']:.3g} -> {'OK' if ok else 'MISMATCH'}")
            print(json.dumps(result))
    return 0


def main(argv=None) -> int:
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
