"""Baichuan2's NormHead as megatron-core's output layer: each vocabulary row of the output weight normalised to unit
length (L2 over the hidden dimension, ``torch.nn.functional.normalize``'s eps 1e-12) before the output product, in
every forward, training and inference alike.

Baichuan2's ``modeling_baichuan.NormHead`` normalises the weight in every training forward (so the gradient flows
through the normalisation into the raw weight) and, at inference, once in place; the logits are the same either way,
so here the normalised weight is computed in every forward and the parameter stays the raw weight: the optimizer
updates it as Baichuan2's training does, and conversion (``aquila_npu.weights``) keeps it as the checkpoint holds it.

The output layer stays megatron-core's ``ColumnParallelLinear`` (its parameter names, tensor-parallel vocabulary
split, sequence-parallel gather and every device's linear) and gets the normalised weight through its public
``weight=`` argument, passed by a forward pre-hook: rows are whole on every TP rank, so the normalisation needs no
communication. Device-independent: the same on the CPU, CUDA and the NPU.
"""

from __future__ import annotations

import torch

ATTRIBUTE = "aquila_norm_head"  # set on an output layer that normalises its weight


EPS = 1e-12  # torch.nn.functional.normalize's


def normalised(weight: torch.Tensor) -> torch.Tensor:
    """The weight with each row ([vocab rows, hidden]) scaled to unit L2 norm: Baichuan2's
    ``nn.functional.normalize(weight)`` (``weight / weight.norm(2, 1).clamp_min(1e-12)``, bit for bit) for every row
    of a norm above 1e-12; a zero row (megatron-core's vocabulary padding, which the converter fills with zeros)
    stays zero with a zero gradient, where ``F.normalize`` would give it a gradient of 1e12 times its logit's (one
    padded row made the first gradient norm of a tiny run 2.7e9)."""
    norm = weight.norm(2, 1, keepdim=True)
    return weight / torch.where(norm > EPS, norm, torch.full_like(norm, float("inf")))


def _normalise_weight(module, args, kwargs):
    """Forward pre-hook: the weight the layer would use (its own, or one given, e.g. tied), normalised."""
    if len(args) > 1:  # weight given positionally
        weight = args[1] if args[1] is not None else module.weight
        return (args[0], normalised(weight), *args[2:]), kwargs
    weight = kwargs.get("weight")
    kwargs["weight"] = normalised(module.weight if weight is None else weight)
    return args, kwargs


def install(output_layer: torch.nn.Module) -> torch.nn.Module:
    """Make ``output_layer`` (megatron-core's ``ColumnParallelLinear``) a NormHead; idempotent."""
    if not getattr(output_layer, ATTRIBUTE, False):
        output_layer.register_forward_pre_hook(_normalise_weight, with_kwargs=True)
        setattr(output_layer, ATTRIBUTE, True)
    return output_layer


def is_norm_head(output_layer) -> bool:
    return bool(getattr(output_layer, ATTRIBUTE, False))
