"""``python -m aquila_npu.plan``: the layouts of a workload that fit the devices, best throughput estimate first,
their memory part by part, and why the others do not fit (``aquila_npu.cli.plan``; the model: ``aquila_npu.planning``)."""

from __future__ import annotations

import json
import os
from typing import List

from aquila_npu.errors import CheckpointError, LayoutError, UsageError
from aquila_npu.device.fused import FusedOps
from aquila_npu.flops import lookup as peak_lookup
from aquila_npu.models.registry import get_model_spec
from aquila_npu.planning import devices
from aquila_npu.planning.layouts import Candidate, Cluster, candidates, check_layout, rank, rivals, why_not
from aquila_npu.planning.memory import Workload
from aquila_npu.weights.mapping import Layout

GIB = devices.GIB
ASSUMED_PEAK_TFLOPS = 300.0  # for ranking a device the table does not know (about a 910B's or an A100's)


def _model(args) -> tuple:
    """(spec, vocabulary padding, where it came from)."""
    if args.model:
        spec, divisible, source = get_model_spec(args.model), args.make_vocab_size_divisible_by, args.model
    elif os.path.isfile(os.path.join(args.load, "config.json")):
        from aquila_npu.models.hf_config import spec_from_hf_config

        spec = spec_from_hf_config(os.path.join(args.load, "config.json"))
        divisible, source = args.make_vocab_size_divisible_by, f"--load {args.load} (Hugging Face)"
    else:
        from aquila_npu.checkpoint.megatron_io import CheckpointInfo

        if not os.path.isdir(args.load):
            raise CheckpointError(f"--load {args.load}: no such directory")
        info = CheckpointInfo.find(args.load)
        if info is None:
            raise CheckpointError(f"--load {args.load}: neither a Megatron checkpoint (latest_checkpointed_"
                                  "iteration.txt) nor a Hugging Face folder (config.json)")
        spec, divisible = info.spec, info.layout.make_vocab_size_divisible_by
        source = f"--load {args.load} (saved as tp{info.layout.tp} pp{info.layout.pp})"
    if args.num_layers:
        spec = spec.replace(num_layers=args.num_layers)
    return spec, divisible, source


def _device(args) -> devices.Device:
    known = devices.lookup(args.device) if args.device else None
    if args.device_memory_gb is not None:
        return devices.custom(args.device_memory_gb, known)
    return known


def workload(args) -> tuple:
    spec, divisible, source = _model(args)
    seq = args.seq_length or spec.max_position_embeddings
    dtype = "fp16" if args.fp16 else "fp32" if args.fp32 else "bf16"
    device = _device(args)
    work = Workload(spec=spec, seq_length=seq, global_batch_size=args.global_batch_size, dtype=dtype,
                    make_vocab_size_divisible_by=divisible, grads_in_fp32=not args.no_accumulate_allreduce_grads_in_fp32,
                    fused=frozenset(FusedOps.KERNELS) if device.kind == "npu" and not args.no_fused else frozenset(),
                    fused_adam=device.kind in ("npu", "cuda"))
    return work, device, source


def _check_fixed_layout(args, work: Workload, size: int) -> None:
    """A --tp / --pp that cannot split the model or the devices: one line naming the flag."""
    for flag, tp, pp in (("--tp", args.tp, None), ("--pp", None, args.pp)):
        value = tp or pp
        if value:
            try:
                Layout(work.spec, tp or 1, pp or 1, work.make_vocab_size_divisible_by)
            except LayoutError as e:
                raise LayoutError(f"{flag} {value}: {e}") from None
            if size % value:
                raise LayoutError(f"{flag} {value} does not divide the {size} devices")
    why = check_layout(work, args.tp or 1, args.pp or 1, size)
    if why and (args.tp and args.pp):
        raise LayoutError(f"--tp {args.tp} --pp {args.pp}: {why}")


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def parts_line(st) -> str:
    return (f"weights {_gib(st.weights)}, gradients {_gib(st.gradients)}, optimizer {_gib(st.optimizer)}, "
            f"activations {_gib(st.activations)} ({st.in_flight} in flight x {_gib(st.micro_batch)}), "
            f"{st.transient_what} {_gib(st.transient)}, communication buffers {_gib(st.comm_buffers)}, "
            f"runtime reserve {_gib(st.reserve)} GiB")


def run(args) -> int:
    work, device, source = workload(args)
    peak = args.device_peak_tflops
    if peak is None and device.peak_name:
        found = peak_lookup(device.peak_name)
        peak = found.tflops if found else None
    assumed = peak is None  # the ranking needs one: computation against communication
    if assumed:
        peak = ASSUMED_PEAK_TFLOPS
    cluster = Cluster(device, args.nproc_per_node, args.nnodes, peak)
    if args.tp or args.pp:
        _check_fixed_layout(args, work, cluster.size)
    if args.micro_batch_size and args.global_batch_size % args.micro_batch_size:
        raise UsageError(f"--micro-batch-size {args.micro_batch_size} does not divide --global-batch-size "
                         f"{args.global_batch_size}")
    capacity = device.usable_bytes
    cands, refused = candidates(work, cluster, capacity, tp=args.tp, pp=args.pp, micro_batch_size=args.micro_batch_size,
                                sequence_parallel=args.sequence_parallel, recompute=args.recompute,
                                distributed_optimizer=args.use_distributed_optimizer, reserve_gib=args.reserve_gb)
    if not cands:
        reasons = "; ".join(sorted({f'tp{t} pp{p}: {why}' for t, p, why in refused})) or "no layout"
        raise LayoutError(f"no layout splits {work.spec.name} over {cluster.size} devices: {reasons}")
    ranked = rank(cands)
    spec = work.spec
    print(f"plan: {spec.name} ({source}; {spec.num_layers} layers, hidden {spec.hidden_size}, "
          f"{spec.num_parameters():,} parameters) on {cluster.nnodes} node(s) x {cluster.nproc_per_node} {device.name} "
          f"({device.usable_gib:.1f} GiB usable each: {device.source}); seq {work.seq_length}, global batch "
          f"{work.global_batch_size}, {work.dtype}, {'fused Ascend kernels' if work.fused else 'plain modules'}")
    print(f"throughput: an estimate for ranking, not a measurement ({peak:g} TFLOP/s peak per device"
          + (", assumed: give --device-peak-tflops" if assumed else "") + "; aquila_npu/planning/layouts.py)")
    if ranked:
        print(f"\n{len(ranked)} layouts fit; the best {min(args.top, len(ranked))} (GiB per device, the fullest "
              "pipeline stage):")
        header = ("#", "layout", "peak", "weights", "grads", "optim", "activ", "transient", "comm", "reserve",
                  "tokens/s/dev", "s/step")
        rows = [header]
        for i, c in enumerate(ranked[:args.top], 1):
            st = c.peak
            rows.append((str(i), c.par.describe(), _gib(st.peak), _gib(st.weights), _gib(st.gradients),
                         _gib(st.optimizer), f"{st.in_flight}x{_gib(st.micro_batch)}", _gib(st.transient),
                         _gib(st.comm_buffers), _gib(st.reserve),
                         f"{c.tokens_per_s:.0f}" if c.tokens_per_s else "-", f"{c.step_s:.2f}" if c.step_s else "-"))
        widths = [max(len(r[k]) for r in rows) for k in range(len(header))]
        for r in rows:
            print("  ".join(v.ljust(wd) if k == 1 else v.rjust(wd) for k, (v, wd) in enumerate(zip(r, widths))))
        best = ranked[0]
        print(f"\n#1 as aquila_npu.pretrain flags: {best.par.flags()}")
        print(f"#1 stage {best.peak.stage}: {parts_line(best.peak)}")
        for i, other in rivals(ranked):
            if best.step_parts and other.step_parts:
                why = ", ".join(f"{k} {best.step_parts[k]:.2f} vs {other.step_parts[k]:.2f}"
                                for k in best.step_parts if best.step_parts[k] or other.step_parts[k])
                print(f"#1 vs #{i} ({other.par.describe()}): {best.step_s:.2f} vs {other.step_s:.2f} s per step "
                      f"(estimate; {why}); peak {_gib(best.peak.peak)} vs {_gib(other.peak.peak)} GiB")
    else:
        print(f"\nno layout fits {_gib(capacity)} GiB per device")
    misses = why_not(cands)
    if misses:
        print("\ndo not fit (the least memory each tp x pp can do):")
        for name, c in misses:
            st = c.peak
            print(f"  {name}: {_gib(st.peak)} GiB > {_gib(capacity)} even as {c.par.describe()} (stage {st.stage}: "
                  f"{parts_line(st)})")
    if refused and not (args.tp or args.pp):
        seen = sorted({(t, p, w) for t, p, w in refused})
        print("\ncannot split the model: " + "; ".join(f"tp{t} pp{p}: {w}" for t, p, w in seen))
    if args.json:
        _write_json(args.json, work, device, cluster, cands)
    return 0


def _write_json(path: str, work: Workload, device, cluster: Cluster, cands: List[Candidate]) -> None:
    from aquila_npu.outputs.files import atomic_file

    out = {"model": work.spec.name, "device": device.name, "usable_gib": device.usable_gib,
           "nproc_per_node": cluster.nproc_per_node, "nnodes": cluster.nnodes, "seq_length": work.seq_length,
           "global_batch_size": work.global_batch_size, "dtype": work.dtype, "fused": work.fused,
           "layouts": [{"layout": c.par.describe(), "flags": c.par.flags(), "fits": c.fits,
                        "tokens_per_s_per_device": c.tokens_per_s, "step_s": c.step_s,
                        "stages": [{"stage": st.stage, "peak_bytes": st.peak, **st.parts(),
                                    "in_flight": st.in_flight, "micro_batch": st.micro_batch}
                                   for st in c.stages]} for c in cands]}
    with atomic_file(path, "--json") as f:
        json.dump(out, f, indent=1)

