"""Worker of the reference-parity tests (tests/test_flagai_parity.py), one per rank (forked or under torchrun):
models given as Hugging Face state dicts, run at one tensor/pipeline layout on the CPU.

``run(cases, out, tp, pp)``: ``cases`` is a torch file (read through ``safe_load``) mapping a name to
``{"spec": ModelSpec fields, "state": {HF name: tensor}, "tokens": [b, s] ids, "keep": positions to keep,
"prompt": ids, "new_tokens": n}``. Every rank loads its stage of each model through the weight-mapping table; the last
stage (TP rank 0) writes ``out``: per name the logits of the last ``keep`` positions (real vocabulary) and the greedy
continuation of ``prompt`` by the KV-cache generator (``inference.generation.TextGenerator``).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps

from aquila_npu.checkpoint import safe_load
from aquila_npu.checkpoint.load_model import build_stage
from aquila_npu.device.setup import setup
from aquila_npu.inference.forward import forward_logits
from aquila_npu.inference.generation import TextGenerator
from aquila_npu.models.registry import ModelSpec
from aquila_npu.parallel import initialize_model_parallel
from aquila_npu.weights.mapping import Layout, hf_stage_to_mcore


def run(cases: str, out: str, tp: int = 1, pp: int = 1) -> int:
    torch.set_num_threads(1)
    dev = setup("cpu")
    initialize_model_parallel(tp, pp)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    results = {}
    for name, case in safe_load.load(cases).items():
        spec = ModelSpec(**case["spec"])
        layout = Layout(spec, tp, pp)
        shard = hf_stage_to_mcore(case["state"].__getitem__, layout, pp_rank)[tp_rank]
        model, _ = build_stage(spec, layout, dev, shard, params_dtype=torch.float32, pp_rank=pp_rank)
        logits = forward_logits(model, case["tokens"])
        generator = TextGenerator(model, hidden_size=spec.hidden_size, params_dtype=torch.float32,
                                  vocab_size=spec.vocab_size, padded_vocab=layout.padded_vocab,
                                  max_sequence_length=spec.max_position_embeddings, device=dev.torch_device)
        greedy = generator.generate([case["prompt"]], case["new_tokens"])[0].token_ids
        if logits is not None and tp_rank == 0:
            results[name] = {"logits": logits[:, -case["keep"]:, :spec.vocab_size].clone(),
                             "greedy": torch.tensor(greedy)}
        del model, generator
    if ps.is_pipeline_last_stage() and tp_rank == 0:
        torch.save(results, out)
    torch.distributed.barrier()
    return 0
