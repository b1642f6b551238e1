"""Training devices as the planner sees them: the memory one process can allocate, the runtime's share of it, and
the links collectives run over. Devices are named as users say them (``910B2``, ``H100``); ``lookup`` also takes the
names torch reports (``Ascend910B2``, ``NVIDIA H100 80GB HBM3``), so ``aquila_npu.pretrain`` finds its own device.
No torch import: the planner's parser lists the names.

Figures and where they come from (``Device.source``); every one can be overridden (``--device-memory-gb``,
``--intra-node-gbps``, ``--inter-node-gbps``, ``--device-peak-tflops``):

* Ascend 910B1 / B2 / B3 (Atlas 800T A2 / 900 A2): 64 GiB of HBM per NPU (Huawei's Atlas 800T A2 specification);
  torch_npu reports about 61 GiB of it (issue 27: users of Ascend/pytorch, MindSpeed-LLM and LLaMA-Factory report
  out-of-memory on a "64 GB" 910B that exposes about 61 GiB). 910B4: 32 GiB, the same 3 GiB withheld (assumed).
  Links: HCCS full mesh inside the node, 7 links x 56 GB/s = 392 GB/s per NPU; between nodes one 200 GE RoCE port per
  NPU, 25 GB/s (Atlas 800T A2 specification).
* Ascend 910C (Atlas A3): torch_npu shows each of a chip's two dies as a device (aquila_npu.flops: ``Ascend910_93xx``)
  with 64 GiB each, 61 GiB visible (as 910B, assumed); links as 910B (assumed; the A3 supernode's are faster).
* NVIDIA A100 80GB / 40GB, H100 80GB (SXM), H200 141GB (SXM): the capacity torch reports
  (``torch.cuda.get_device_properties().total_memory``: 79.2 / 39.4 / 79.1 / 139.8 GiB); NVLink 300 GB/s (A100) /
  450 GB/s (H100, H200) per direction inside the node, one 200 Gb/s (A100, HDR) / 400 Gb/s (H100, H200, NDR)
  InfiniBand port per GPU between nodes (NVIDIA's data sheets).

Collectives reach a fraction of a link's figure: ``BUS_EFFICIENCY`` (assumed 0.7 everywhere; NCCL/HCCL bus bandwidth
tests reach 0.7-0.85 of the links on large messages).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional

GIB = 1024 ** 3
BUS_EFFICIENCY = 0.7

# What the runtime keeps of the memory torch can allocate, besides our tensors: the collectives' buffers are a
# planned part of their own (memory.comm_buffers); this is the allocator's fragmentation and the kernels' workspace.
# Assumed, not measured: 3% of the device, at least 1 GiB. --reserve-gb overrides it.
RESERVE_FRACTION = 0.03
RESERVE_MIN_GIB = 1.0

# HCCL's communication buffer per communicator (HCCL_BUFFSIZE, MB; CANN's default 200: the HCCL environment
# variable reference), for input and output each. NCCL's are a few MB per channel; counted as 0.
HCCL_BUFFSIZE_MB = 200


@dataclass(frozen=True)
class Device:
    name: str  # as users say it: 910B2, H100
    kind: str  # npu / cuda
    usable_gib: float  # what one process can allocate (torch's total_memory)
    hbm_gib: float  # the memory the device has
    peak_name: str  # the aquila_npu.flops table's name (peak TFLOP/s)
    intra_gbps: float  # GB/s per device inside a node (one direction)
    inter_gbps: float  # GB/s per device between nodes
    source: str

    @property
    def usable_bytes(self) -> int:
        return int(self.usable_gib * GIB)


_ASCEND = ("Huawei Atlas 800T A2 specification (64 GiB HBM per NPU, HCCS 392 GB/s, 200 GE RoCE per NPU); "
           "about 61 GiB visible to torch_npu (issue 27's user reports)")
_910C = ("as 910B per die (assumed: torch_npu shows each die of a 910C as a device with 64 GiB HBM); "
         "aquila_npu.flops for its peak")
_A100 = "NVIDIA A100 data sheet (NVLink 600 GB/s both directions, HDR 200 Gb/s per GPU); torch's total_memory"
_H100 = "NVIDIA H100 / H200 data sheets (NVLink 900 GB/s both directions, NDR 400 Gb/s per GPU); torch's total_memory"

DEVICES: Dict[str, Device] = {d.name: d for d in [
    Device("910B1", "npu", 61.0, 64, "Ascend910B1", 392, 25, _ASCEND),
    Device("910B2", "npu", 61.0, 64, "Ascend910B2", 392, 25, _ASCEND),
    Device("910B3", "npu", 61.0, 64, "Ascend910B3", 392, 25, _ASCEND),
    Device("910B4", "npu", 29.0, 32, "Ascend910B4", 392, 25,
           _ASCEND.replace("64 GiB HBM", "32 GiB HBM (910B4)").replace("61 GiB", "29 GiB (the same 3 GiB withheld, "
                                                                                   "assumed)")),
    Device("910C", "npu", 61.0, 64, "Ascend910_9392", 392, 25, _910C),
    Device("A100", "cuda", 79.2, 80, "NVIDIA A100", 300, 25, _A100),
    Device("A100-40GB", "cuda", 39.4, 40, "NVIDIA A100", 300, 25, _A100),
    Device("H100", "cuda", 79.1, 80, "NVIDIA H100", 450, 50, _H100),
    Device("H200", "cuda", 139.8, 141, "NVIDIA H200", 450, 50, _H100),
]}


def _norm(name: str) -> str:
    return "".join(c for c in name.upper() if c.isalnum())


def lookup(name: str) -> Optional[Device]:
    """A device by the name users say (``910b2``, ``h100``) or torch reports (``Ascend910B2``,
    ``NVIDIA H100 80GB HBM3``, ``NVIDIA A100-SXM4-40GB``, ``Ascend910_9392``); None when unknown."""
    n = _norm(name)
    for key in sorted(DEVICES, key=len, reverse=True):
        d = DEVICES[key]
        if n in (_norm(key), _norm(d.peak_name)):
            return d
    if n.startswith("ASCEND910") and n[len("ASCEND910"):].startswith("93"):
        return DEVICES["910C"]
    if n.startswith("NVIDIA"):
        for model in ("H200", "H100", "A100"):
            if model in n and "GH200" not in n:
                return DEVICES["A100-40GB"] if model == "A100" and "40GB" in n else DEVICES[model]
    return None


def custom(memory_gib: float, base: Optional[Device] = None, kind: str = "npu") -> Device:
    """A device given by its memory (``--device-memory-gb``), with a known device's links and peak if named."""
    if base is not None:
        return replace(base, usable_gib=memory_gib, source=f"--device-memory-gb {memory_gib:g}; {base.source}")
    return Device("custom", kind, memory_gib, memory_gib, "", 392 if kind == "npu" else 450,
                  25 if kind == "npu" else 50, f"--device-memory-gb {memory_gib:g}; links assumed as a 910B's")


def reserve_bytes(device: Device, override_gib: Optional[float] = None) -> int:
    if override_gib is not None:
        return int(override_gib * GIB)
    return int(max(device.usable_gib * RESERVE_FRACTION, RESERVE_MIN_GIB) * GIB)
