"""QLoRA's 4-bit base: the decoder linears as bitsandbytes' NF4 with double quantisation (blocksize 64), cut into
tensor-parallel shards so that every layout dequantises to the same weights as bitsandbytes does for Hugging Face.

Each Hugging Face linear (q/k/v/o_proj, gate/up/down_proj) is quantised whole, exactly as transformers' bitsandbytes
integration quantises it when it loads the model (``bitsandbytes.functional.quantize_4bit(W, blocksize=64,
compress_statistics=True, quant_type="nf4")``): 4-bit codes, one absmax per 64 values, the absmax values themselves
quantised to 8 bits in blocks of 256 around their mean. The shards are then cut from that result along the weight
table's tensor-parallel split (``weights.mapping.rank_slice``), so a rank holds only its part:

* ``<linear>.weight``: the packed codes of its rows (uint8, two codes a byte), ``[rows, columns / 2]``;
* ``<linear>.weight_absmax``: each 64-value block's absmax as bitsandbytes' double quantisation gives it back
  (``dequantize_blockwise(qabsmax, state2) + offset``, the first step of its ``dequantize_4bit``), fp32,
  ``[rows, columns / 64]``;
* ``<linear>.weight_columns``: the shard's columns ``[lo, hi)`` within the dequantised block.

A column-parallel shard (qkv per query group, fc1's gate / up halves) is whole rows, so whole blocks. A
row-parallel shard (proj, fc2) is a range of columns of every row; where the range does not start and end on a
64-value block (Aquila2-7B's fc2 at tp8: 11008 / 8 = 1376 columns, 21.5 blocks) the shard holds the blocks it
touches and ``weight_columns`` says which columns are its own.

Why not quantise each shard on its own (what MindSpeed-LLM's converter does)? The double quantisation's offset is
the mean absmax of the whole tensor and its 256-block groups run across the tensor, so a shard quantised alone
dequantises to other weights than bitsandbytes' model has, and each layout to its own: tp1 and tp8 runs would train
different bases. Holding the double-quantised absmax per block as fp32 costs 4 bytes per 64 values instead of
about 1.06, so the base takes 0.5625 bytes per parameter (bitsandbytes' single-process model: 0.516).

Dequantisation is bitsandbytes' ``dequantize_4bit`` (its CPU kernel, its CUDA kernel, or its pure-torch default
kernel on any other device: the NPU without bitsandbytes' NPU build). Every call imports bitsandbytes inside the
function: importing this module imports neither it nor megatron-core.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Tuple

from aquila_npu.errors import CheckpointError, UsageError
from aquila_npu.weights.table import Row, lora_target

if TYPE_CHECKING:
    import torch
    from torch import Tensor

QUANT_TYPE = "nf4"
BLOCKSIZE = 64
DOUBLE_QUANT = True
ABSMAX, COLUMNS = "_absmax", "_columns"  # suffixes of the weight's key
INSTALL = "pip install 'aquila_npu[qlora]' (bitsandbytes 0.50)"


def settings(dtype: torch.dtype) -> dict:
    """What a checkpoint records of its NF4 base (``aquila.qlora_nf4``); a base recorded otherwise is refused."""
    import bitsandbytes

    from aquila_npu.models.dtypes import dtype_name

    return {"quant_type": QUANT_TYPE, "blocksize": BLOCKSIZE, "double_quant": DOUBLE_QUANT,
            "dtype": dtype_name(dtype), "bitsandbytes": bitsandbytes.__version__}


def check_settings(recorded: dict, where: str) -> None:
    """A base quantised otherwise than bitsandbytes' NF4 / 64 / double quantisation is refused in one line."""
    want = {"quant_type": QUANT_TYPE, "blocksize": BLOCKSIZE, "double_quant": DOUBLE_QUANT}
    bad = [f"{k} {recorded.get(k)!r}" for k, v in want.items() if recorded.get(k) != v]
    if bad:
        raise CheckpointError(f"{where}: its base is quantised otherwise ({', '.join(bad)}) than QLoRA's NF4 "
                              f"(quant_type 'nf4', blocksize {BLOCKSIZE}, double_quant True); convert it again from "
                              "the Hugging Face weights with --qlora-nf4")


def require_bitsandbytes(flag: str) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError(f"{flag} needs bitsandbytes, which is not installed: {INSTALL}")


def is_quantised_row(row: Row) -> bool:
    """The rows QLoRA stores as NF4: every decoder linear (the embedding, norms and output layer stay as they are,
    as transformers' bitsandbytes integration leaves them)."""
    return lora_target(row) is not None


@dataclass
class Quantised:
    """One Hugging Face linear weight ``[out, in]`` as bitsandbytes quantises it, as two row-aligned images that
    ``mapping.rank_slice`` can cut like the weight: codes ``[out, in / 2]`` and absmax ``[out, in / 64]``."""

    codes: "Tensor"
    absmax: "Tensor"
    dtype: "torch.dtype"
    name: str = ""


def quantise(w: Tensor, name: str = "") -> Quantised:
    """bitsandbytes' NF4 with double quantisation of one HF linear weight (the dtype it is stored in: what
    transformers quantises when it loads the model in that dtype)."""
    from bitsandbytes import functional as F

    out, cols = w.shape
    if cols % BLOCKSIZE:
        raise CheckpointError(f"{name or 'a linear weight'}: rows of {cols} values, not a multiple of "
                              f"bitsandbytes' {BLOCKSIZE}-value blocks: its NF4 blocks would cross rows, which no "
                              "tensor-parallel shard can hold")
    packed, state = F.quantize_4bit(w.contiguous(), blocksize=BLOCKSIZE, compress_statistics=DOUBLE_QUANT,
                                    quant_type=QUANT_TYPE)
    absmax = F.dequantize_blockwise(state.absmax, state.state2)  # as dequantize_4bit does for a nested state
    absmax += state.offset
    return Quantised(packed.view(out, cols // 2), absmax.float().view(out, cols // BLOCKSIZE), w.dtype, name)


def slab(total: int, tp: int, rank: int) -> Tuple[int, int, int, int]:
    """A row-parallel shard's columns ``[a, b)`` of ``total`` and the whole blocks holding them ``[s, e)``:
    (s, e, a - s, b - s)."""
    n = total // tp
    a, b = rank * n, (rank + 1) * n
    s, e = a // BLOCKSIZE * BLOCKSIZE, -(-b // BLOCKSIZE) * BLOCKSIZE
    return s, e, a - s, b - s


def rank_shard(row: Row, quantised: List[Quantised], layout, rank: int) -> Dict[str, Tensor]:
    """TP rank ``rank``'s NF4 tensors of a linear row: {"": codes, ABSMAX: absmax, COLUMNS: [lo, hi]}."""
    import torch

    from aquila_npu.weights.mapping import rank_slice

    if row.kind == "row":
        q = quantised[0]
        s, e, lo, hi = slab(q.codes.shape[1] * 2, layout.tp, rank)
        codes, absmax = q.codes[:, s // 2:e // 2], q.absmax[:, s // BLOCKSIZE:e // BLOCKSIZE]
    else:  # whole rows: the table's split of the weight, applied to both images
        codes = rank_slice(row, [q.codes for q in quantised], layout, rank)
        absmax = rank_slice(row, [q.absmax for q in quantised], layout, rank)
        lo, hi = 0, codes.shape[1] * 2
    return {"": codes.contiguous().clone(), ABSMAX: absmax.contiguous().clone(),
            COLUMNS: torch.tensor([lo, hi], dtype=torch.int64)}


def dequantise(codes: Tensor, absmax: Tensor, columns, dtype: torch.dtype) -> Tensor:
    """One shard's weight ``[rows, hi - lo]`` in ``dtype`` (the dtype it was quantised from), by bitsandbytes'
    ``dequantize_4bit``: equal, bit for bit, to the same rows and columns of bitsandbytes' dequantised HF weight.
    ``columns``: (lo, hi), or the stored ``weight_columns`` tensor."""
    import torch
    from bitsandbytes import functional as F

    rows, width = codes.shape[0], codes.shape[1] * 2
    state = F.QuantState(absmax=absmax.reshape(-1), shape=torch.Size((rows, width)), dtype=dtype,
                         blocksize=BLOCKSIZE, quant_type=QUANT_TYPE)
    w = F.dequantize_4bit(codes, state)
    lo, hi = (int(c) for c in (columns.tolist() if hasattr(columns, "tolist") else columns))
    return w if (lo, hi) == (0, width) else w[:, lo:hi]


def shard_geometry(kind: str, in_total: int, tp: int, rank: int) -> Tuple[int, int, int]:
    """(rows-independent) width of a shard's dequantised block and its own columns (lo, hi): a row-parallel
    shard's blocks (``slab``), else whole rows of ``in_total``."""
    if kind == "row":
        s, e, lo, hi = slab(in_total, tp, rank)
        return e - s, lo, hi
    return in_total, 0, in_total


def shard_keys(key: str) -> Tuple[str, str, str]:
    return key, key + ABSMAX, key + COLUMNS


def is_nf4_key(key: str) -> bool:
    return key.endswith(ABSMAX) or key.endswith(COLUMNS)


def dequantised_state(sd: Dict[str, Tensor], dtype: torch.dtype) -> Dict[str, Tensor]:
    """A rank's state dict with every NF4 linear dequantised (to ``dtype``, its quantisation dtype) under its plain
    ``.weight`` key: what ``mapping.mcore_stage_to_hf`` merges into bitsandbytes' dequantised HF weights."""
    out = {}
    for k, v in sd.items():
        if is_nf4_key(k):
            continue
        if k + ABSMAX in sd:
            v = dequantise(v, sd[k + ABSMAX], sd[k + COLUMNS], dtype)
        out[k] = v
    return out


def cast_state(sd: Dict[str, Tensor], dtype: torch.dtype) -> Dict[str, Tensor]:
    """A rank's state dict for a model of ``dtype``: NF4 codes, absmax and column ranges as stored, the other
    weights cast."""
    quantised = {k for k in sd if is_nf4_key(k) or k + ABSMAX in sd}
    return {k: v if k in quantised else v.to(dtype) for k, v in sd.items()}


def nf4_bytes(sd: Dict[str, Tensor]) -> Tuple[int, int]:
    """(bytes, parameters) of the NF4 linears of a state dict: codes, absmax and column ranges against the weights'
    own parameter count."""
    nbytes = params = 0
    for k, v in sd.items():
        if k + ABSMAX in sd:
            lo, hi = (int(c) for c in sd[k + COLUMNS].tolist())
            params += v.shape[0] * (hi - lo)
            nbytes += sum(t.numel() * t.element_size() for t in (v, sd[k + ABSMAX], sd[k + COLUMNS]))
    return nbytes, params


class QuantisedReader:
    """HF linears quantised once each (cached until ``release``) from a reader of HF-named weights, cast to
    ``dtype`` first (the dtype transformers would load and quantise them in)."""

    def __init__(self, reader, dtype: torch.dtype):
        self.reader, self.dtype = reader, dtype
        self._cache: Dict[str, Quantised] = {}

    def get(self, name: str) -> Quantised:
        if name not in self._cache:
            self._cache[name] = quantise(self.reader.get(name)[:].to(self.dtype), name)
        return self._cache[name]

    def release(self) -> None:
        self._cache.clear()


def rank_state(reader: QuantisedReader, layout, pp_rank: int, tp_rank: int) -> Dict[str, Tensor]:
    """The NF4 tensors of every decoder linear of one (stage, TP rank)."""
    out: Dict[str, Tensor] = {}
    for row, i, local in layout.stage_rows(pp_rank):
        if not is_quantised_row(row):
            continue
        key = row.mcore.format(i=local)
        parts = rank_shard(row, [reader.get(h.format(i=i)) for h in row.hf], layout, tp_rank)
        out.update({key + suffix: t for suffix, t in parts.items()})
    return out
