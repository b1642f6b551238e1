"""Tiny random Hugging Face LLaMA models shaped like Aquila2 (GQA, untied, no bias) for tests: the registry's
``aquila2-tiny-gqa`` (``TINY``) with the seeded weights of ``aquila_npu.weights.seeded``."""

from __future__ import annotations

import torch

from aquila_npu.models.registry import ModelSpec, get_model_spec
from aquila_npu.weights import seeded

TINY = get_model_spec("aquila2-tiny-gqa")


def tiny_llama(spec: ModelSpec = TINY, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A deterministic random ``transformers.LlamaForCausalLM`` of the given shape (same weights for the same seed;
    norm weights not all ones, so a mapping mistake there shows)."""
    return seeded.hf_model(spec, seed, dtype)


def tiny_peft(target_modules, r: int = 4, lora_alpha: float = 8, seed: int = 1, share_fused_a: bool = False,
              lora_dropout: float = 0.0, spec: ModelSpec = TINY):
    """``peft.PeftModel`` on ``tiny_llama(spec)`` with random non-zero adapters (deterministic for the seed).

    ``share_fused_a``: q/k/v (and gate/up) get one A, as the split of a fused megatron-core adapter does; otherwise
    each module has its own, as a Hugging Face LoRA run trains them."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(spec), LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                                        target_modules=list(target_modules), task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        if share_fused_a:
            for layer in model.base_model.model.model.layers:
                for block, first, others in ((layer.self_attn, "q_proj", ("k_proj", "v_proj")),
                                             (layer.mlp, "gate_proj", ("up_proj",))):
                    if hasattr(getattr(block, first), "lora_A"):
                        for o in others:
                            getattr(block, o).lora_A["default"].weight.copy_(
                                getattr(block, first).lora_A["default"].weight)
    return model.eval()
