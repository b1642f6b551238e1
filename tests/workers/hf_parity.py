"""Worker for the parity tests: our megatron-core model vs Hugging Face LLaMA, logits on the same tokens.

    torchrun --nproc-per-node N tests/workers/hf_parity.py --tp T --pp P [--kernels npu] [--dtype bf16] --out F.json

Every rank builds the same tiny random HF model (fixed seed), loads its stage through the weight-mapping table,
and the last pipeline stage (TP rank 0) writes the max |ours - HF| into --out.
"""

import argparse
import contextlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from aquila_npu.device.backends import FusedOps  # noqa: E402
from aquila_npu.device.setup import setup  # noqa: E402
from aquila_npu.inference.forward import forward_logits  # noqa: E402
from aquila_npu.models.config import DTYPES, transformer_config  # noqa: E402
from aquila_npu.models.gpt import build_model  # noqa: E402
from aquila_npu.parallel import initialize_model_parallel  # noqa: E402
from aquila_npu.testing import npu_emulator  # noqa: E402
from aquila_npu.testing.tiny_hf import TINY, tiny_llama  # noqa: E402
from aquila_npu.weights.load import load_stage_state  # noqa: E402
from aquila_npu.weights.mapping import Layout, hf_stage_to_mcore  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--kernels", default=None, help="backend modules: cpu (plain) or npu (emulated fused kernels)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    dtype = DTYPES[a.dtype]
    emulate = a.kernels == "npu" and a.device != "npu"
    with npu_emulator.installed() if emulate else contextlib.nullcontext() as fake_npu:
        fused = FusedOps.all() if a.kernels == "npu" or a.device != "cpu" and a.kernels else FusedOps()
        dev = setup(a.device, fused, kernels=a.kernels)
        initialize_model_parallel(a.tp, a.pp)
        from megatron.core import parallel_state as ps

        hf = tiny_llama(dtype=dtype).to(dev.torch_device)
        layout = Layout(TINY, a.tp, a.pp, make_vocab_size_divisible_by=8)
        pp_rank, tp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
        cfg = transformer_config(TINY, tensor_parallel=a.tp, pipeline_parallel=a.pp, params_dtype=dtype,
                                 **dev.backend.config_overrides())
        model = build_model(TINY, cfg, dev.backend, padded_vocab=layout.padded_vocab, pre_process=pp_rank == 0,
                            post_process=pp_rank == a.pp - 1, pp_rank=pp_rank, parallel_output=False)
        shard = hf_stage_to_mcore(hf.state_dict().__getitem__, layout, pp_rank)[tp_rank]
        load_stage_state(model, shard)
        model.to(dev.torch_device).eval()
        torch.manual_seed(1)
        tokens = torch.randint(3, TINY.vocab_size, (2, 24), device=dev.torch_device)
        logits = forward_logits(model, tokens)
        if logits is not None and tp_rank == 0:
            with torch.no_grad():
                ref = hf(tokens).logits.float()
            ours = logits.float()
            result = {"max_abs_diff": (ours[..., : TINY.vocab_size] - ref).abs().max().item(),
                      "ref_abs_max": ref.abs().max().item(), "padded_vocab": ours.shape[-1],
                      "argmax_agree": (ours[..., : TINY.vocab_size].argmax(-1) == ref.argmax(-1)).float().mean().item(),
                      "tp": a.tp, "pp": a.pp, "kernels": dev.kernels, "dtype": a.dtype,
                      "emulated_npu_calls": dict(fake_npu.calls) if fake_npu is not None else {}}
            with open(a.out, "w") as f:
                json.dump(result, f)
            print(json.dumps(result))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
