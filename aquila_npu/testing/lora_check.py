"""Worker for the LoRA model tests (tests/test_lora_model.py), under torchrun on the CPU:

    torchrun --nproc-per-node 4 -m aquila_npu.testing.lora_check --tp 2 --pp 2 --cases cases.json --out result.json

Every rank builds the tiny random HF model's stage (``tiny_llama``, seed 0) and, for each case, injects adapters with
the case's settings: fresh ones (B = 0), whose logits must equal the base model's, or those of an adapter checkpoint
(converted from a PEFT adapter for this layout), whose logits are compared with the reference file the test wrote
from ``PeftModel``. The last stage (TP rank 0) writes, per case, the trainable-parameter count and the logits'
differences.
"""

import argparse
import json

import torch
from megatron.core import parallel_state as ps

from aquila_npu.checkpoint import safe_load
from aquila_npu.checkpoint.load_model import build_stage
from aquila_npu.device.setup import setup
from aquila_npu.inference.forward import forward_logits
from aquila_npu.lora.checkpoint import AdapterCheckpoint
from aquila_npu.lora.layers import apply_lora
from aquila_npu.lora.settings import LoraSettings
from aquila_npu.lora.state import load_adapters, parameter_counts
from aquila_npu.parallel import initialize_model_parallel
from aquila_npu.testing.tiny_hf import TINY, tiny_llama
from aquila_npu.weights.mapping import Layout, hf_stage_to_mcore


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--cases", required=True, help="JSON list of {name, settings, adapter?, reference?}")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    with open(a.cases) as f:
        cases = json.load(f)
    hf_state = tiny_llama().state_dict()  # before setup(): see DEVELOPERS.md
    dev = setup("cpu")
    initialize_model_parallel(a.tp, a.pp)
    pp_rank, tp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    layout = Layout(TINY, a.tp, a.pp, make_vocab_size_divisible_by=8)
    shard = hf_stage_to_mcore(hf_state.__getitem__, layout, pp_rank)[tp_rank]
    tokens = safe_load.load(cases[0]["tokens"], mmap=False)
    results = {}
    for case in cases:
        model, cfg = build_stage(TINY, layout, dev, shard, params_dtype=torch.float32, pp_rank=pp_rank)
        base = forward_logits(model, tokens)
        settings = LoraSettings.from_dict(case["settings"])
        apply_lora(model, cfg, settings, layout, pp_rank)
        r = {"counts": parameter_counts(model)}
        if case.get("adapter"):
            ck = AdapterCheckpoint(case["adapter"])
            assert ck.settings == settings, (ck.settings, settings)
            missing, unexpected = load_adapters(model, ck.rank_file(tp_rank, pp_rank)["model"])
            r["missing"], r["unexpected"] = missing, unexpected
        logits = forward_logits(model, tokens)
        if logits is not None and tp_rank == 0:
            ours = logits.float()[..., :TINY.vocab_size]
            r["b0_equal"] = bool(torch.equal(logits, base))
            r["diff_vs_base"] = (logits - base).abs().max().item()
            if case.get("reference"):
                ref = safe_load.load(case["reference"], mmap=False)
                r["max_abs_diff"] = (ours - ref).abs().max().item()
                r["ref_abs_max"] = ref.abs().max().item()
        results[case["name"]] = r
    if ps.is_pipeline_last_stage() and tp_rank == 0:
        with open(a.out, "w") as f:
            json.dump(results, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
