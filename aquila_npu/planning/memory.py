"""The memory of one training layout on each pipeline stage's devices, part by part, from the code's own shapes.

* **parameters** of a (stage, tensor-parallel rank): the weight mapping's own split (``weights.mapping.rank_slice``
  run on meta tensors of the Hugging Face shapes, ``hf_shapes``), so vocabulary padding, grouped-query heads and the
  SwiGLU packing come out exactly as the model is built; the stage holding the embedding or the output layer is the
  biggest.
* **weights** in the training dtype; **gradients**: megatron-core DDP's contiguous gradient buffer, fp32 with
  ``--accumulate-allreduce-grads-in-fp32`` (our default) else the training dtype; **optimizer states**: Adam's two
  moments in fp32, plus fp32 main parameters for bf16 / fp16 (megatron-core's mixed-precision optimizer), divided by
  the data-parallel size with ``--use-distributed-optimizer`` (each rank owns a shard).
* **activations per micro-batch**: what the autograd graph of one layer keeps for backward, term by term
  (``layer_terms``; which module keeps what is written beside each term, for the plain modules of
  ``device/torch_modules`` and megatron-core, and for the Ascend fused kernels of ``device/npu_modules``), times the
  stage's layers; with full recomputation (megatron-core's uniform method) only each chunk's input is kept and one
  chunk is rebuilt during its backward; selective recomputation (megatron-core's ``core_attn``) drops the attention
  kernel's own saved output.
* **in flight**: megatron-core's 1F1B pipeline schedule keeps the activations of ``pp - stage`` micro-batches on a
  stage (at most the number of micro-batches); without pipelining one. Each in-flight micro-batch also keeps the
  stage's received input and sent output (``deallocate_pipeline_outputs`` is off in our config).
* **transient**: the largest extra working set on top of the kept activations: on the last stage the logits (the
  output layer's [s, b, vocab/tp] in the training dtype while megatron-core's vocab-parallel cross entropy makes its
  fp32 softmax, which it keeps and turns into the gradient in place, then the gradient cast back), elsewhere one
  layer's backward (its output gradient and the SwiGLU gradients), and after the backward the optimizer step's
  temporaries (torch's single-tensor AdamW on the CPU: two tensors the size of the biggest parameter; the fused
  kernel of npu / cuda: none).
* **communication buffers** (devices only): HCCL keeps an input and an output buffer of ``HCCL_BUFFSIZE`` (200 MB by
  default) per communicator a rank uses (tensor-, data-, pipeline- and model-parallel groups).
* **runtime reserve** (devices only): ``devices.reserve_bytes``.

The peak of a stage = weights + gradients + optimizer + (in flight - 1) x a micro-batch's kept memory + max(one
micro-batch's kept memory + its transient, the optimizer step's temporaries), plus buffers and reserve on a device.
Checked against torch's allocator on CPU runs of the debug models (``aquila_npu.benchmarking.memory``,
tests/test_plan.py, docs/benchmark.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Tuple

import torch

from aquila_npu.models.registry import ModelSpec
from aquila_npu.planning.devices import HCCL_BUFFSIZE_MB, Device, reserve_bytes
from aquila_npu.weights.mapping import Layout, hf_shapes, rank_slice

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class Workload:
    """What is trained, independent of the layout."""

    spec: ModelSpec
    seq_length: int
    global_batch_size: int
    dtype: str = "bf16"  # fp32 / bf16 / fp16
    make_vocab_size_divisible_by: int = 1
    grads_in_fp32: bool = True  # --accumulate-allreduce-grads-in-fp32 (our default)
    fused: FrozenSet[str] = frozenset()  # Ascend fused kernels (FusedOps.KERNELS names) instead of plain modules
    fused_adam: bool = False  # torch's fused AdamW (npu / cuda): no temporaries in the optimizer step
    # the plain attention runs SDPA's math kernel (planning.runs.sdpa_keeps_probabilities: torch 2.6's CPU flash
    # kernel has no GQA), which keeps the probabilities [b, n, s, s] for the backward instead of the log-sum-exp
    attention_probabilities: bool = False

    @property
    def w(self) -> int:
        return DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class Parallel:
    """One layout: the parallel sizes and the memory-saving switches."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    micro_batch_size: int = 1
    sequence_parallel: bool = False
    recompute: str = "none"  # none / selective / full
    distributed_optimizer: bool = False
    recompute_method: str = "uniform"  # full: uniform (chunks of recompute_num_layers) / block (that many per stage)
    recompute_num_layers: int = 1

    @property
    def sp(self) -> bool:
        return self.sequence_parallel and self.tp > 1

    def num_microbatches(self, global_batch_size: int) -> int:
        return global_batch_size // (self.micro_batch_size * self.dp)

    def describe(self) -> str:
        parts = [f"tp{self.tp}", f"pp{self.pp}", f"dp{self.dp}"]
        if self.sp:
            parts.append("sp")
        if self.recompute == "full" and (self.recompute_method, self.recompute_num_layers) != ("uniform", 1):
            parts.append(f"recompute-full-{self.recompute_method}-{self.recompute_num_layers}")
        elif self.recompute != "none":
            parts.append(f"recompute-{self.recompute}")
        if self.distributed_optimizer:
            parts.append("dist-opt")
        return " ".join(parts) + f", micro-batch {self.micro_batch_size}"

    def flags(self) -> str:
        """The aquila_npu.pretrain flags of this layout."""
        out = [f"--tensor-model-parallel-size {self.tp}", f"--pipeline-model-parallel-size {self.pp}",
               f"--micro-batch-size {self.micro_batch_size}"]
        if self.sp:
            out.append("--sequence-parallel")
        if self.recompute == "full":
            out.append(f"--recompute-granularity full --recompute-method {self.recompute_method} "
                       f"--recompute-num-layers {self.recompute_num_layers}")
        elif self.recompute == "selective":
            out.append("--recompute-granularity selective")
        if self.distributed_optimizer:
            out.append("--use-distributed-optimizer")
        return " ".join(out)


PARTS = ("weights", "gradients", "optimizer", "activations", "transient", "comm_buffers", "reserve")


@dataclass
class StageMemory:
    """One pipeline stage's memory per device, in bytes."""

    stage: int
    parameters: int  # numel on one tensor-parallel rank of the stage
    weights: int
    gradients: int
    optimizer: int
    micro_batch: int  # what one in-flight micro-batch keeps (activations, pipeline tensors)
    in_flight: int
    transient: int  # the largest extra working set (logits / a layer's backward / the optimizer step)
    transient_what: str
    comm_buffers: int = 0
    reserve: int = 0
    terms: Dict[str, int] = field(default_factory=dict)  # one layer's kept activations, term by term

    @property
    def activations(self) -> int:
        return self.micro_batch * self.in_flight

    @property
    def allocated(self) -> int:
        """Peak of what torch's allocator hands out (what a CPU run's measurement sees)."""
        return self.weights + self.gradients + self.optimizer + self.activations + self.transient

    @property
    def peak(self) -> int:
        return self.allocated + self.comm_buffers + self.reserve

    def parts(self) -> Dict[str, int]:
        return {p: getattr(self, p) for p in PARTS}


@functools.lru_cache(maxsize=256)
def stage_parameters(spec: ModelSpec, tp: int, pp: int, divisible_by: int = 1) -> Tuple[int, ...]:
    """Parameters (numel) on one tensor-parallel rank of each pipeline stage, as ``weights.mapping`` splits them
    (raises ``LayoutError`` for a layout that does not divide the model)."""
    layout = Layout(spec, tp, pp, divisible_by)
    shapes = hf_shapes(spec)
    meta = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    out = []
    for stage in range(pp):
        n = 0
        for row, i, _ in layout.stage_rows(stage):
            sources = [meta[name.format(i=i) if i is not None else name] for name in row.hf]
            n += rank_slice(row, sources, layout, 0).numel()
        out.append(n)
    return tuple(out)


def largest_parameter(spec: ModelSpec, tp: int, divisible_by: int = 1) -> int:
    """numel of the biggest parameter on one tensor-parallel rank (the embedding or output layer shard)."""
    layout = Layout(spec, tp, 1, divisible_by)
    return max(layout.padded_vocab // tp * spec.hidden_size, 2 * spec.intermediate_size // tp * spec.hidden_size)


def layer_terms(work: Workload, par: Parallel) -> Dict[str, int]:
    """Bytes one transformer layer keeps for backward per micro-batch, by who keeps them (one TP rank)."""
    s, b, t = work.seq_length, par.micro_batch_size, par.tp
    spec, w, fused = work.spec, work.w, work.fused
    h, f, d = spec.hidden_size, spec.intermediate_size, spec.head_dim
    a, g = spec.num_attention_heads // t, spec.num_key_value_heads // t
    tokens = s * b
    local = tokens // t if par.sp else tokens  # tokens of the sequence-sharded tensors (norms, residual)
    out: Dict[str, int] = {}
    if "rmsnorm" in fused:
        # npu_rms_norm keeps its input and the fp32 reciprocal RMS per token (x2: input and pre-MLP norm)
        out["norms"] = 2 * (local * h * w + local * 4)
    else:
        # Aquila RMSNorm in fp32 (torch_modules.rms_norm_reference): x.float() and x * rsqrt(...) in fp32 (x2)
        out["norms"] = 2 * (2 * local * h * 4 + local * 4)
    # linear_qkv and linear_fc1 keep their input; with sequence parallelism the shard (gathered again in backward)
    out["linear inputs"] = 2 * local * h * w
    # the qkv projection's output: k and v are views of it (megatron-core's get_query_key_value_tensors), kept by
    # whoever keeps k or v
    out["qkv"] = tokens * (a + 2 * g) * d * w
    # rotary's outputs (q, k rotated), kept by the attention. megatron-core's rotary (t * cos + rotate_half(t) * sin)
    # keeps only cos / sin ([s, 1, 1, d] per q and k); npu_rotary_mul_backward(grad, self, r1, r2) needs its input:
    # q (megatron-core copies the query heads out of the packed qkv) and k (a view of it)
    out["rotary"] = tokens * (a + g) * d * w + (tokens * a * d * w if "rotary" in fused else 4 * s * d * w)
    if "flash_attn" in fused:
        # npu_fusion_attention_grad(query, key, value, dy, ..., softmax_max, softmax_sum, attention_in): v copied
        # contiguous into SBH (q, k are), the output (linear_proj's input too), fp32 softmax max and sum [b, n, s, 8]
        # (selective recomputation: the output only, kept by linear_proj; the rest is rebuilt in the backward)
        inside = tokens * g * d * w + 2 * b * a * s * 8 * 4
        out["attention"] = tokens * a * d * w + (0 if par.recompute == "selective" else inside)
    else:
        # SDPA's flash kernel keeps its output (linear_proj's input is a view of it) and the fp32 log-sum-exp
        # [b, n, s] (selective recomputation: the output only, kept by linear_proj)
        # (the math kernel of torch 2.6 computes bf16 / fp16 in fp32: its probabilities are fp32 in every dtype)
        kept = b * a * s * s * 4 if work.attention_probabilities else b * a * s * 4
        out["attention"] = tokens * a * d * w + (0 if par.recompute == "selective" else kept)
    # SwiGLU: fc1's output [gate | up] and the product (linear_fc2's input); megatron-core's own SwiGLU also keeps
    # silu(gate) and up + glu_linear_offset (a new tensor, 0.0 added); npu_swiglu_backward(grad, self) needs only
    # the input
    out["mlp"] = tokens * (f // t) * w * (3 if "swiglu" in fused else 5)
    return out


def _layer_backward(work: Workload, par: Parallel) -> int:
    """Extra memory while one layer runs its backward: the gradients of fc1's output and of the SwiGLU product."""
    tokens = work.seq_length * par.micro_batch_size
    return tokens * (work.spec.intermediate_size // par.tp) * work.w * 3


def _logits(work: Workload, par: Parallel, padded_vocab: int) -> int:
    """The loss's working set on the last stage: megatron-core's vocab-parallel cross entropy makes an fp32 copy of
    the logits (the logits themselves in fp32), keeps it as the softmax and turns it into the gradient in place; in
    bf16 / fp16 the logits, then the gradient cast back, exist beside it; and the output layer's weight gradient
    until the gradient buffer takes it."""
    tokens, v = work.seq_length * par.micro_batch_size, padded_vocab // par.tp
    return tokens * v * (4 + (work.w if work.w < 4 else 0)) + v * work.spec.hidden_size * work.w


def _communicators(par: Parallel) -> int:
    return sum(n > 1 for n in (par.tp, par.dp, par.pp, par.tp * par.pp))


def estimate(work: Workload, par: Parallel, device: Optional[Device] = None,
             reserve_gib: Optional[float] = None) -> List[StageMemory]:
    """Every pipeline stage's memory per device (comm buffers and reserve only for a device)."""
    spec, w = work.spec, work.w
    params = stage_parameters(spec, par.tp, par.pp, work.make_vocab_size_divisible_by)
    padded = Layout(spec, par.tp, 1, work.make_vocab_size_divisible_by).padded_vocab
    m = par.num_microbatches(work.global_batch_size)
    layers = spec.num_layers // par.pp
    terms = layer_terms(work, par)
    per_layer = sum(terms.values())
    tokens = work.seq_length * par.micro_batch_size
    local = tokens // par.tp if par.sp else tokens
    boundary = local * spec.hidden_size * w  # one [s, b, h] tensor between stages (sharded with sp)
    out = []
    for stage, n in enumerate(params):
        first, last = stage == 0, stage == par.pp - 1
        weights = n * w
        gradients = n * (4 if work.grads_in_fp32 else w)
        states = 8 + (4 if w < 4 else 0)  # Adam's moments, + fp32 main parameters for bf16 / fp16
        optimizer = n * states // (par.dp if par.distributed_optimizer else 1)
        rebuilt = 0  # what full recomputation rebuilds at once in the backward (one chunk)
        if par.recompute == "full" and par.recompute_method == "uniform":
            k = min(par.recompute_num_layers, layers)
            kept, rebuilt = -(-layers // k) * boundary, k * per_layer  # each chunk's input kept
        elif par.recompute == "full":  # block: the first k layers of the stage recomputed, one at a time
            k = min(par.recompute_num_layers, layers)
            kept, rebuilt = k * boundary + (layers - k) * per_layer, per_layer if k else 0
        else:
            kept = layers * per_layer
        # the schedule keeps each in-flight micro-batch's received input (which a plain fp32 RMSNorm or the fused
        # one keeps anyway) and sent output
        kept_input = not first and not ("rmsnorm" in work.fused or w == 4)
        pipeline = (boundary if kept_input else 0) + (0 if last else boundary)
        if last:  # the final norm and the output layer's input
            kept += terms["norms"] // 2 + local * spec.hidden_size * w
        in_flight = min(par.pp - stage, m) if par.pp > 1 else 1
        transient = rebuilt + _layer_backward(work, par)
        what = "a recomputed layer's backward" if rebuilt else "a layer's backward"
        if last and _logits(work, par, padded) > transient:
            transient, what = _logits(work, par, padded), "logits and their fp32 softmax"
        step = 0 if work.fused_adam else 2 * 4 * largest_parameter(spec, par.tp, work.make_vocab_size_divisible_by)
        micro = kept + pipeline
        if step > micro * in_flight + transient:  # the optimizer step's temporaries, after the activations are gone
            transient, what = step - micro * in_flight, "the optimizer step's temporaries"
        comm = _communicators(par) * 2 * HCCL_BUFFSIZE_MB * 10 ** 6 if device is not None and device.kind == "npu" else 0
        reserve = reserve_bytes(device, reserve_gib) if device is not None else 0
        out.append(StageMemory(stage=stage, parameters=n, weights=weights, gradients=gradients, optimizer=optimizer,
                               micro_batch=micro, in_flight=in_flight, transient=transient, transient_what=what,
                               comm_buffers=comm, reserve=reserve, terms=terms))
    return out


def worst(stages: List[StageMemory]) -> StageMemory:
    return max(stages, key=lambda st: st.peak)
