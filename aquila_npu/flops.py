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

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from aquila_npu.models.registry import ModelSpec

# ------------------------------------------------------------------------------------------------- device peaks
# Peak dense 16-bit (bf16 / fp16) matrix TFLOP/s of ONE device as torch sees it (no sparsity), the MFU denominator.
# Devices are matched by the name torch reports: torch.npu.get_device_name() (CANN's SoC name, e.g. 'Ascend910B2',
# 'Ascend910_9392') or torch.cuda.get_device_name() (e.g. 'NVIDIA H100 80GB HBM3'). A device not in the table has
# no MFU until --device-peak-tflops gives its peak.

# An Ascend AI core's cube unit multiplies a 16x16x16 fp16 block per cycle: 4096 MACs = 8192 FLOP per cycle (CANN's
# platform config: cube_m_size = cube_n_size = cube_k_size = 16; Huawei's DaVinci description: 4096 MACs per cycle
# per core). Cross-check: 32 cores x 8192 x 1.0 GHz = 262 TFLOP/s against Huawei's published 256 for the Ascend 910.
CUBE_FLOP_PER_CYCLE = 2 * 16 * 16 * 16

CANN_PLATFORM_CONFIG = ("CANN 8.1.RC1 platform_config/{soc}.ini: ai_core_cnt={cores}, cube_freq={mhz} (MHz); "
                        "derived: {cores} AI cores x {mhz} MHz x 8192 FLOP/cycle (public copy of the files: "
                        "github.com/leideng/CANN-8.1.RC1 @551ed27, Ascend/ascend-toolkit/8.1.RC1/aarch64-linux/data/"
                        "platform_config/)")

# Ascend SoCs by their CANN / torch_npu name: (AI cores, AI-core cube clock in MHz), as CANN's platform config lists
# them. Huawei publishes no per-variant data sheet for the 910B / 910C families, so their peaks are derived.
ASCEND_SOCS: Dict[str, Tuple[int, int]] = {
    # Ascend 910, first generation (AIC-C-100). "Ascend910B" here is one of its SKUs, not the 910B1-B4 family.
    "Ascend910A": (32, 1000), "Ascend910ProA": (32, 1100), "Ascend910ProB": (30, 1150),
    "Ascend910PremiumA": (32, 1220), "Ascend910B": (30, 900),
    # Ascend 910B family (Atlas A2, AIC-C-220)
    "Ascend910B1": (24, 1850), "Ascend910B2": (24, 1800), "Ascend910B2C": (24, 1800), "Ascend910B3": (20, 1800),
    "Ascend910B4": (20, 1500), "Ascend910B4-1": (20, 1500),
    # Ascend 910C family (Atlas A3, "Ascend910_93xx"), per device torch_npu reports
    "Ascend910_9362": (20, 1500), "Ascend910_9372": (20, 1800), "Ascend910_9381": (24, 1800),
    "Ascend910_9382": (24, 1800), "Ascend910_9391": (24, 1850), "Ascend910_9392": (24, 1850),
}

# A vendor-published figure wins over the derived one.
PUBLISHED: Dict[str, Tuple[float, str]] = {
    "Ascend910A": (256.0, "Huawei, Ascend 910 launch (23 Aug 2019): 256 TFLOPS FP16 (e.g. pureai.com/articles/2019/09/"
                          "03/nws-huawei-ascend-910-processor.aspx; Linley Group, 8 Oct 2019); derived from CANN's "
                          "platform config: 32 x 1000 MHz x 8192 = 262"),
}

_A100 = "NVIDIA A100 data sheet: BF16/FP16 Tensor Core 312 TFLOPS dense (624 with sparsity), SXM and PCIe"
_H100 = "NVIDIA H100 data sheet / Hopper whitepaper: BF16 Tensor Core, dense (half the 'with sparsity' figure)"
# NVIDIA GPUs: (model in the name, form factor in the name: 'PCIE', 'NVL' or '' for SXM, TFLOP/s, source).
NVIDIA_GPUS: List[Tuple[str, str, float, str]] = [
    ("A100", "", 312.0, _A100),
    ("A100", "PCIE", 312.0, _A100),
    ("H100", "", 989.4, _H100 + ", SXM5"),
    ("H100", "PCIE", 756.0, _H100 + ", PCIe"),
    ("H100", "NVL", 835.0, _H100 + ", NVL"),
    ("H200", "", 989.4, "NVIDIA H200 data sheet (SXM): the H100 SXM's GH100 compute, 989.4 BF16 dense"),
]


@dataclass(frozen=True)
class DevicePeak:
    tflops: Optional[float]  # None: unknown (no MFU)
    source: str  # where the figure comes from, or why there is none


def _norm(name: str) -> str:
    return name.replace(" ", "").replace("-", "").replace("_", "").upper()


def table() -> Dict[str, DevicePeak]:
    """Every device of the table by the name torch reports (NVIDIA: '<model> [PCIe|NVL]'), with its source."""
    out = {}
    for soc, (cores, mhz) in ASCEND_SOCS.items():
        derived = cores * mhz * 1e6 * CUBE_FLOP_PER_CYCLE / 1e12
        tflops, source = PUBLISHED.get(soc, (round(derived, 1), CANN_PLATFORM_CONFIG.format(soc=soc, cores=cores,
                                                                                            mhz=mhz)))
        out[soc] = DevicePeak(tflops, source)
    for model, form, tflops, source in NVIDIA_GPUS:
        out[f"NVIDIA {model}{' ' + form.replace('PCIE', 'PCIe') if form else ''}"] = DevicePeak(tflops, source)
    return out


def lookup(device_name: str) -> Optional[DevicePeak]:
    """The table's entry for a device name as torch reports it: an Ascend SoC by its exact name (so 'Ascend910B'
    is not an 'Ascend910B2'), an NVIDIA GPU by its model and form factor ('NVIDIA H100 PCIe', 'NVIDIA A100-SXM4-80GB');
    None when unknown (e.g. a form factor the table lacks, such as an H200 NVL)."""
    norm = _norm(device_name)
    for soc in ASCEND_SOCS:
        if norm == _norm(soc):
            return table()[soc]
    upper = device_name.upper()
    form = "PCIE" if "PCIE" in norm else "NVL" if "NVL" in norm else ""
    for model, gpu_form, tflops, source in NVIDIA_GPUS:  # the model as a word: a GH200 is not an H200
        if upper.startswith("NVIDIA") and re.search(rf"(?<![A-Z0-9]){model}(?![A-Z0-9])", upper) and gpu_form == form:
            return DevicePeak(tflops, source)
    return None


def device_peak(device_name: Optional[str], override: Optional[float] = None) -> DevicePeak:
    """The MFU denominator: ``override`` (--device-peak-tflops), else the table's figure for ``device_name`` (None:
    the CPU, which has no peak)."""
    if override is not None:
        return DevicePeak(override, "--device-peak-tflops")
    if device_name is None:
        return DevicePeak(None, "CPU: no peak, no MFU")
    return lookup(device_name) or DevicePeak(
        None, f"no peak TFLOP/s known for the device '{device_name}': MFU is n/a until --device-peak-tflops gives "
              "its dense bf16/fp16 peak")


def training_flops_per_token(spec: ModelSpec, seq_length: int, padded_vocab: Optional[int] = None) -> float:
    h, f, L = spec.hidden_size, spec.intermediate_size, spec.num_layers
    g_over_a = spec.num_key_value_heads / spec.num_attention_heads
    v = padded_vocab or spec.vocab_size
    per_layer = 2 * h * h * (1 + g_over_a) + 2 * seq_length * h + 3 * h * f
    return 6.0 * (L * per_layer + h * v)


def training_flops_breakdown(spec: ModelSpec, seq_length: int, padded_vocab: Optional[int] = None) -> Dict[str, float]:
    """``training_flops_per_token`` by where the profile puts the time: the layers' linear GEMMs (QKV, O, SwiGLU MLP),
    attention (Q K^T and A V) and the output layer; the three add up to ``training_flops_per_token``."""
    h, f, L = spec.hidden_size, spec.intermediate_size, spec.num_layers
    g_over_a = spec.num_key_value_heads / spec.num_attention_heads
    return {"gemm": 6.0 * L * (2 * h * h * (1 + g_over_a) + 3 * h * f), "attention": 6.0 * L * 2 * seq_length * h,
            "output_and_loss": 6.0 * h * (padded_vocab or spec.vocab_size)}


def flagperf_flops_per_token(parameters: int) -> float:
    """FlagPerf's training FLOPs per token (its Aquila2-7B case: 6 x 7e9 x tokens/s / peak): 6 x the parameters,
    no attention term; beside ours for MFU figures quoted from FlagPerf."""
    return 6.0 * parameters
