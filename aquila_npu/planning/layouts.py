"""Every training layout of a workload on N devices, its memory (``memory.estimate``) and a throughput estimate, the
ones that fit ranked best first, and why the others do not fit.

The throughput estimate (tokens per second per device) is a model of one iteration's time, for ranking layouts
against each other; it is not a measurement:

* compute: the model FLOPs of the global batch (``flops.training_flops_per_token``) plus what recomputation repeats
  (full: the forward again, + 1/3; selective: the attention scores and weighted sum again), at ``EFFICIENCY`` of the
  device's peak (``flops``'s table);
* tensor parallelism: per layer and micro-batch, 4 all-gather / reduce-scatter (or 2 all-reduce) of an [s, b, h]
  tensor in the forward and 4 in the backward (full recomputation repeats the forward's), each moving (tp-1)/tp of
  it, at the bus bandwidth of the node's links (between nodes when tp spans nodes); not overlapped;
* pipeline: 1F1B's bubble, (pp - 1) / micro-batches of the busy time, and the [s, b, h] sends between stages;
* data parallelism: the gradients' all-reduce (fp32), or with the distributed optimizer their reduce-scatter and the
  parameters' all-gather, once per iteration, between nodes when the job has several; not overlapped.

Ties are broken by the smaller memory. ``EFFICIENCY`` 0.6 puts ModelLink's Aquila2-7B layout on 8 x 910B2 at
4.3 s per step against the 4.93 s ModelLink publishes (seeds: ModelLink's Aquila2 README).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

from aquila_npu.errors import LayoutError
from aquila_npu.flops import training_flops_per_token
from aquila_npu.planning.devices import BUS_EFFICIENCY, Device
from aquila_npu.planning.memory import (RECOMPUTE, Parallel, StageMemory, Workload, estimate, stage_parameters,
                                        worst)
from aquila_npu.weights.mapping import Layout

EFFICIENCY = 0.6  # of the peak, for the matrix products (assumed; see the module's docstring)


@dataclass(frozen=True)
class Cluster:
    device: Device
    nproc_per_node: int
    nnodes: int = 1
    peak_tflops: Optional[float] = None  # per device; None: throughput is not estimated (memory only)

    @property
    def size(self) -> int:
        return self.nproc_per_node * self.nnodes


@dataclass
class Candidate:
    par: Parallel
    stages: List[StageMemory]
    capacity: int  # bytes a device has for the plan (usable)
    step_s: Optional[float]
    tokens_per_s: Optional[float]  # per device
    step_parts: Optional[dict] = None  # seconds per iteration by cause (step_time)

    @property
    def peak(self) -> StageMemory:
        return worst(self.stages)

    @property
    def fits(self) -> bool:
        return self.peak.peak <= self.capacity


def step_time(work: Workload, par: Parallel, cluster: Cluster) -> Tuple[float, dict]:
    """(seconds per iteration, the parts) by the model of the module's docstring."""
    spec, s, gbs = work.spec, work.seq_length, work.global_batch_size
    padded = Layout(spec, par.tp, 1, work.make_vocab_size_divisible_by).padded_vocab
    dev = cluster.device
    per_token = training_flops_per_token(spec, s, padded)
    if par.recompute == "full":
        per_token *= 4 / 3
    elif par.recompute == "selective":
        per_token += 2 * 2 * s * spec.hidden_size * spec.num_layers  # scores and weighted sum, forward again
    compute = gbs * s * per_token / (cluster.size * cluster.peak_tflops * 1e12 * EFFICIENCY)
    intra, inter = dev.intra_gbps * 1e9 * BUS_EFFICIENCY, dev.inter_gbps * 1e9 * BUS_EFFICIENCY
    m = par.num_microbatches(gbs)
    hidden = s * par.micro_batch_size * spec.hidden_size * work.w  # one [s, b, h] tensor
    layers = spec.num_layers // par.pp
    tp_bw = intra if par.tp <= cluster.nproc_per_node else inter
    collectives = 8 + (4 if par.recompute == "full" else 0)
    tp = m * layers * collectives * hidden * (par.tp - 1) / par.tp / tp_bw if par.tp > 1 else 0.0
    pp_bw = intra if par.tp * par.pp <= cluster.nproc_per_node else inter
    p2p = m * 2 * hidden / (par.tp if par.sp else 1) / pp_bw if par.pp > 1 else 0.0
    busy = compute + tp + p2p
    bubble = busy * (par.pp - 1) / m
    n = max(stage_parameters(spec, par.tp, par.pp, work.make_vocab_size_divisible_by))
    dp_bw = inter if cluster.nnodes > 1 else intra
    if par.dp > 1:
        grads = n * (4 if work.grads_in_fp32 else work.w)
        volume = grads + (n * work.w if par.distributed_optimizer else grads)  # RS + AG, or all-reduce = 2 x
        dp = volume * (par.dp - 1) / par.dp / dp_bw
    else:
        dp = 0.0
    total = busy + bubble + dp
    return total, {"compute": compute, "tensor-parallel": tp, "pipeline sends": p2p, "bubble": bubble,
                   "data-parallel": dp}


def _divisors(n: int) -> List[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def check_layout(work: Workload, tp: int, pp: int, size: int) -> Optional[str]:
    """Why tp x pp cannot split the model on ``size`` devices, or None."""
    if size % (tp * pp):
        return f"tp{tp} x pp{pp} does not divide the {size} devices"
    try:
        Layout(work.spec, tp, pp, work.make_vocab_size_divisible_by)
    except LayoutError as e:
        return str(e)
    dp = size // (tp * pp)
    if work.global_batch_size % dp:
        return f"the global batch {work.global_batch_size} is not a multiple of the data-parallel size {dp}"
    return None


def candidates(work: Workload, cluster: Cluster, capacity: int, *, tp: Optional[int] = None,
               pp: Optional[int] = None, micro_batch_size: Optional[int] = None,
               sequence_parallel: Optional[bool] = None, recompute: Optional[str] = None,
               distributed_optimizer: Optional[bool] = None, reserve_gib: Optional[float] = None
               ) -> Tuple[List[Candidate], List[Tuple[int, int, str]]]:
    """(every layout's candidate, [(tp, pp, why it cannot split the model)]); ``None`` arguments are searched."""
    out, refused = [], []
    size = cluster.size
    for t in ([tp] if tp else _divisors(size)):
        for p in ([pp] if pp else _divisors(size // t if size % t == 0 else 1)):
            why = check_layout(work, t, p, size)
            if why:
                if tp or pp or (size % (t * p) == 0):
                    refused.append((t, p, why))
                continue
            dp = size // (t * p)
            per_rank = work.global_batch_size // dp
            for mbs in ([micro_batch_size] if micro_batch_size else _divisors(per_rank)):
                if per_rank % mbs:
                    refused.append((t, p, f"--micro-batch-size {mbs} x data-parallel size {dp} does not divide "
                                          f"the global batch {work.global_batch_size}"))
                    continue
                for sp in _choices(sequence_parallel, (True, False) if t > 1 else (False,)):
                    for rc in ([recompute] if recompute else RECOMPUTE):
                        for do in _choices(distributed_optimizer, (False, True) if dp > 1 else (False,)):
                            par = Parallel(tp=t, pp=p, dp=dp, micro_batch_size=mbs, sequence_parallel=sp,
                                           recompute=rc, distributed_optimizer=do)
                            stages = estimate(work, par, cluster.device, reserve_gib)
                            step, tokens, parts = None, None, None
                            if cluster.peak_tflops:
                                step, parts = step_time(work, par, cluster)
                                tokens = work.global_batch_size * work.seq_length / step / size
                            out.append(Candidate(par, stages, capacity, step, tokens, parts))
    return out, refused


def _choices(given: Optional[bool], default: Iterable[bool]) -> Tuple[bool, ...]:
    return (given,) if given is not None else tuple(default)


def rank(cands: List[Candidate]) -> List[Candidate]:
    """The ones that fit, best throughput estimate first (then the smaller memory)."""
    fit = [c for c in cands if c.fits]
    return sorted(fit, key=lambda c: (-(c.tokens_per_s or 0.0), c.peak.peak))


def rivals(ranked: List[Candidate], n: int = 2) -> List[Tuple[int, Candidate]]:
    """The best-ranked layout of each other tensor x pipeline split, (1-based rank, candidate), up to ``n``."""
    seen, out = {(ranked[0].par.tp, ranked[0].par.pp)} if ranked else set(), []
    for i, c in enumerate(ranked, 1):
        key = (c.par.tp, c.par.pp)
        if key not in seen:
            seen.add(key)
            out.append((i, c))
        if len(out) == n:
            break
    return out


def why_not(cands: List[Candidate]) -> List[Tuple[str, Candidate]]:
    """For each tp x pp with no layout that fits: its smallest-memory layout (what it would need)."""
    best = {}
    for c in cands:
        key = (c.par.tp, c.par.pp)
        if key not in best or c.peak.peak < best[key].peak.peak:
            best[key] = c
    fits = {(c.par.tp, c.par.pp) for c in cands if c.fits}
    return [(f"tp{t} pp{p}", best[(t, p)]) for (t, p) in sorted(best) if (t, p) not in fits]
