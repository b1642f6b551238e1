"""Model FLOPs of a training step and device peaks, for TFLOP/s and MFU.

Per token, one transformer layer multiplies (MACs, forward): Q and O projections h*h each, K and V h*(g/a)*h each
(g key/value groups, a heads), attention scores Q K^T and the weighted sum A V s*h each (full s x s, as Megatron-LM
counts; causal masking is not subtracted), the SwiGLU MLP 3*h*f (gate, up, down); plus the output layer h*V once per
token. FLOPs = 2 x MACs; forward + backward = 3 x forward. So per token of a training step

    6 * [ L * (2*h*h*(1 + g/a) + 2*s*h + 3*h*f) + h*V ]

which is Megatron-LM's ``num_floating_point_operations`` for GQA + SwiGLU (activation recomputation is not
counted: these are model FLOPs, so MFU does not reward recomputing).
"""

from __future__ import annotations

from typing import Optional

from aquila_npu.models.registry import ModelSpec

# Peak dense 16-bit (bf16/fp16) tensor TFLOP/s per device, from the vendors' data sheets (no sparsity).
DEVICE_PEAK_TFLOPS = {
    "Ascend 910B": 313.0,  # Atlas 800T A2 / 910B3-class, FP16
    "NVIDIA A100": 312.0,
    "NVIDIA H100 PCIe": 756.0,  # before the generic H100 entry: the first match wins
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H100": 989.4,  # SXM
    "NVIDIA H200": 989.4,
}


def training_flops_per_token(spec: ModelSpec, seq_length: int, padded_vocab: Optional[int] = None) -> float:
    h, f, L = spec.hidden_size, spec.intermediate_size, spec.num_layers
    g_over_a = spec.num_key_value_heads / spec.num_attention_heads
    v = padded_vocab or spec.vocab_size
    per_layer = 2 * h * h * (1 + g_over_a) + 2 * seq_length * h + 3 * h * f
    return 6.0 * (L * per_layer + h * v)


def peak_tflops(device_name: str) -> Optional[float]:
    """The table's peak for a device name as torch reports it (e.g. 'NVIDIA H100 80GB HBM3', 'Ascend910B2')."""
    norm = device_name.replace(" ", "").lower()
    for key, value in DEVICE_PEAK_TFLOPS.items():
        vendor_free = key.split(" ", 1)[1].replace(" ", "").lower()
        if vendor_free in norm:
            return value
    return None
