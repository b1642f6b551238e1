"""Random weights that depend on a seed and nothing else: the selfcheck's models, the demo's and benchmarks' random
starting points and the tests' tiny Hugging Face models are made from them, so that a reference computed once (the
selfcheck's CPU losses, ``aquila_npu/checks/reference.json``) stays valid when transformers or torch change how they
initialise a model.

Every Hugging Face tensor of the model (``weights.mapping.hf_shapes``, in table order) is drawn from numpy's legacy
``RandomState(seed)`` (a stream numpy guarantees never to change): matrices and embeddings normal with standard
deviation ``std`` (transformers' LLaMA default is 0.02), norm weights ``1 + norm_jitter * normal`` (not all ones, so
that a mistake in mapping a norm shows).
"""

from __future__ import annotations

import hashlib
import json
from typing import Dict

import numpy as np
import torch

from aquila_npu.models.registry import ModelSpec
from aquila_npu.weights.mapping import hf_shapes

STD = 0.02
NORM_JITTER = 0.1


def hf_weights(spec: ModelSpec, seed: int = 0, std: float = STD, norm_jitter: float = NORM_JITTER,
               dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """{Hugging Face name: tensor} of the whole model, drawn in table order from ``RandomState(seed)``."""
    rng = np.random.RandomState(seed)
    out = {}
    for name, shape in hf_shapes(spec).items():
        x = rng.standard_normal(shape).astype(np.float32)
        x = 1.0 + norm_jitter * x if name.endswith("norm.weight") else std * x
        out[name] = torch.from_numpy(x).to(dtype)
    return out


def digest(weights: Dict[str, torch.Tensor]) -> str:
    """sha256 of the names, shapes, dtypes and bytes of ``weights``, in order."""
    h = hashlib.sha256()
    for name, t in weights.items():
        h.update(json.dumps([name, list(t.shape), str(t.dtype)]).encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def hf_model(spec: ModelSpec, seed: int = 0, dtype: torch.dtype = torch.float32, **draw):
    """``transformers.LlamaForCausalLM`` of ``spec`` holding ``hf_weights(spec, seed, **draw)`` (eager attention, eval
    mode); transformers' own initialisation is overwritten entirely."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{k: v for k, v in spec.to_hf_config().items() if k not in ("architectures", "model_type")},
                      attn_implementation="eager")
    model = LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(hf_weights(spec, seed, **draw), strict=False)
    if unexpected or [k for k in missing if not k.endswith("rotary_emb.inv_freq")]:
        raise RuntimeError(f"seeded weights do not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    return model.eval().to(dtype)
