"""Worker for the QLoRA logits tests (tests/test_qlora.py), under torchrun on the CPU:

    torchrun --nproc-per-node 4 -m aquila_npu.testing.qlora_check --base NF4_DIR --adapter DIR --dtype bf16 \
        --tokens tokens.pt --reference logits.pt [--exact exact.pt] --out result.json

Every rank builds its stage of the NF4 base (``convert_ckpt.py --qlora-nf4`` output, at the run's tp/pp) with the
adapter checkpoint on it (``lora.stage.adapted_stage``), computes the logits of the given tokens, and the last stage
(TP rank 0) writes their largest difference from the reference file the test wrote from transformers + bitsandbytes
+ peft, from the base without the adapter, and (``--exact``) from the same model computed in fp32 arithmetic (the
dequantised weights cast to fp32): how far bf16 / fp16 rounding takes each implementation.
"""

import argparse
import json

import torch
from megatron.core import parallel_state as ps

from aquila_npu.checkpoint import safe_load
from aquila_npu.checkpoint.megatron_io import CheckpointInfo
from aquila_npu.device.setup import setup
from aquila_npu.inference.forward import forward_logits
from aquila_npu.lora.checkpoint import AdapterCheckpoint
from aquila_npu.lora.stage import adapted_stage
from aquila_npu.models.dtypes import DTYPES
from aquila_npu.parallel import initialize_model_parallel


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--tokens", required=True)
    p.add_argument("--reference", required=True)
    p.add_argument("--exact", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    dev = setup(a.device)
    info = CheckpointInfo.read(a.base)
    initialize_model_parallel(info.layout.tp, info.layout.pp)
    pp_rank, tp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    dtype = DTYPES[a.dtype]
    tokens = safe_load.load(a.tokens, mmap=False).to(dev.torch_device)
    result = {}
    for name, adapter in (("base", None), ("adapted", AdapterCheckpoint(a.adapter))):
        model, _ = adapted_stage(info, dev, params_dtype=dtype, pp_rank=pp_rank, adapter=adapter)
        logits = forward_logits(model, tokens)
        if logits is not None:
            result[name] = logits.float().cpu()[..., :info.spec.vocab_size]
    if ps.is_pipeline_last_stage() and tp_rank == 0:
        ref = safe_load.load(a.reference, mmap=False).float()
        out = {"max_abs_diff": (result["adapted"] - ref).abs().max().item(),
               "ref_abs_max": ref.abs().max().item(),
               "diff_vs_base": (result["adapted"] - result["base"]).abs().max().item(),
               "nf4_modules": sum(type(m).__name__.startswith("NF4") for m in model.modules())}
        if a.exact:
            out["exact_abs_diff"] = (result["adapted"] - safe_load.load(a.exact, mmap=False).float()).abs().max().item()
        with open(a.out, "w") as f:
            json.dump(out, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
