"""Measure training throughput: run ``aquila_npu.pretrain`` with ``--mock-data --metrics-file`` in a subprocess
(``torchrun`` for several processes), drop the warm-up iterations, aggregate the rest."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import List, Optional

from aquila_npu.benchmarking import environment
from aquila_npu.device.backends import FusedOps
from aquila_npu.errors import BenchmarkFailed, FusedKernelUnavailable
from aquila_npu.flops import flagperf_flops_per_token, training_flops_per_token
from aquila_npu.models import arch_flags
from aquila_npu.launch import launch_command, run_logged
from aquila_npu.models.registry import ModelSpec, get_model_spec, padded_vocab_size

SCHEMA = "aquila_npu.benchmark/1"
FORMULA = "6 * [L * (2*h*h*(1 + g/a) + 2*s*h + 3*h*f) + h*V] per token (aquila_npu.flops, docs/benchmark.md)"
FLAGPERF_FORMULA = "6 * parameters per token (FlagPerf's MFU: no attention term)"


@dataclass
class Settings:
    model: str
    num_layers: Optional[int]
    seq_length: Optional[int]
    micro_batch_size: int
    global_batch_size: Optional[int]
    tp: int
    pp: int
    nproc: int
    dtype: str  # bf16 / fp16 / fp32
    device: str  # npu / cuda / cpu (resolved)
    warmup: int
    iters: int
    fused_switches: List[str]  # FusedOps field names the "fused" run turns on
    peak_tflops: Optional[float] = None
    extra: List[str] = field(default_factory=list)  # passed to aquila_npu.pretrain verbatim
    timeout: Optional[float] = None
    profile: bool = False  # each run profiles its last warm-up iteration (--profile-breakdown)


def model_spec(model: str, num_layers: Optional[int] = None, seq_length: Optional[int] = None) -> ModelSpec:
    """The registry architecture, ``num_layers`` deep (same width), with positions for ``seq_length`` tokens."""
    spec = get_model_spec(model)
    if num_layers is not None and num_layers != spec.num_layers:
        spec = spec.replace(num_layers=num_layers, name=f"{spec.name}-{num_layers}l")
    if seq_length is not None and seq_length > spec.max_position_embeddings:
        spec = spec.replace(max_position_embeddings=seq_length)  # RoPE: no learned positions to run out of
    return spec


def pretrain_argv(s: Settings, spec: ModelSpec, fused: bool, metrics_file: str) -> List[str]:
    """Flags of the training entry point for one measured run."""
    if spec == get_model_spec(s.model):
        arch = ["--model", s.model]
    else:  # a derived architecture: every flag, the vocabulary by --vocab-size (no tokenizer with mock data)
        arch = arch_flags.to_argv(spec)
    argv = [*arch, "--seq-length", seq_length(s, spec), "--mock-data", "--train-iters", s.warmup + s.iters,
            "--micro-batch-size", s.micro_batch_size, "--tensor-model-parallel-size", s.tp,
            "--pipeline-model-parallel-size", s.pp, "--lr", "1e-5", "--lr-decay-style", "constant",
            "--log-interval", 1, "--eval-interval", s.warmup + s.iters + 1, "--metrics-file", metrics_file,
            "--device", s.device]
    if s.global_batch_size:
        argv += ["--global-batch-size", s.global_batch_size]
    if s.dtype != "fp32":
        argv.append(f"--{s.dtype}")
    if s.peak_tflops is not None:
        argv += ["--device-peak-tflops", s.peak_tflops]
    if fused:
        argv += FusedOps.from_names(s.fused_switches).requested()
    return [str(a) for a in argv] + list(s.extra)


def _tail(path: str, lines: int = 40) -> str:
    with open(path) as f:
        return "".join(f.readlines()[-lines:])


def read_metrics(path: str) -> List[dict]:
    """The training iterations of a --metrics-file (validation lines left out)."""
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return [r for r in recs if "step_time_s" in r]


def read_features(records: List[dict]) -> Optional[dict]:
    """The speed features the training run reported having on (``aquila_npu.training.features``: in its first
    logged iteration)."""
    return next((r["run_features"] for r in records if "run_features" in r), None)


OVERLAP_FLAGS = ("--overlap-grad-reduce", "--overlap-param-gather")


def overlap_toggled(extra: List[str]) -> List[str]:
    """The pretrain flags with Megatron's communication overlap the other way round: on (grad reduce, and param
    gather where the distributed optimizer is on) when ``extra`` has it off, off when on."""
    if "--overlap-grad-reduce" in extra:
        return [a for a in extra if a not in OVERLAP_FLAGS]
    return [*extra, *OVERLAP_FLAGS[:1 + ("--use-distributed-optimizer" in extra)]]


def peak_memory(records: List[dict]) -> dict:
    """Largest memory figures the writing rank logged: the accelerator allocator's, or the host RSS on CPU."""
    mem = {}
    for r in records:
        for key, value in (r.get("memory") or {}).items():
            mem[key] = max(mem.get(key, 0.0), value)
    if "max_allocated_gb" in mem:
        return {"peak_memory_gb": mem["max_allocated_gb"], "peak_memory_kind": "device max allocated", **mem}
    if "max_rss_gb" in mem:
        return {"peak_memory_gb": mem["max_rss_gb"], "peak_memory_kind": "host max RSS", **mem}
    return {"peak_memory_gb": None, "peak_memory_kind": None}


def aggregate(records: List[dict], *, warmup: int, tokens_per_step: int, world: int,
              flops_per_token: float) -> dict:
    """Median step time of the iterations after ``warmup`` and the figures that follow from it."""
    measured = [r for r in records if r["iteration"] > warmup]
    if not measured:
        raise BenchmarkFailed(f"no iteration after the {warmup} warm-up iterations was logged")
    times = [r["step_time_s"] for r in measured]
    step = statistics.median(times)
    tokens = tokens_per_step / step / world
    return {"measured_iterations": [r["iteration"] for r in measured], "step_times_s": times,
            "step_time_s": step, "step_time_s_mean": statistics.fmean(times), "step_time_s_min": min(times),
            "step_time_s_max": max(times), "tokens_per_sec_per_device": tokens,
            "tflops_per_device": tokens * flops_per_token / 1e12, "final_lm_loss": measured[-1]["lm_loss"],
            **peak_memory(measured)}


def measure(s: Settings, spec: ModelSpec, fused: bool, workdir: str, echo=print, tag: Optional[str] = None) -> dict:
    """One training run (fused or plain kernels), aggregated."""
    tag = tag or ("fused" if fused else "unfused")
    metrics = os.path.join(workdir, f"metrics-{tag}.jsonl")
    log_path = os.path.join(workdir, f"train-{tag}.log")
    if os.path.exists(metrics):
        os.remove(metrics)
    profile = os.path.join(workdir, f"profile-{tag}.json") if s.profile else None
    if profile and os.path.exists(profile):
        os.remove(profile)
    argv = pretrain_argv(s, spec, fused, metrics)
    if profile:  # the last warm-up iteration (not measured), or the first without warm-up
        argv += ["--profile-breakdown", profile, "--profile-step", str(max(s.warmup, 1))]
    cmd = launch_command(s.nproc, argv)
    rc = run_logged(cmd, log_path, s.timeout, echo)
    if rc != 0:
        raise BenchmarkFailed(f"the {tag} training run exited with status {rc}:\n$ {shlex.join(cmd)}\n"
                             f"{_tail(log_path)}(full log: {log_path})")
    records = read_metrics(metrics) if os.path.exists(metrics) else []
    gbs = records[0]["global_batch_size"] if records else 0
    out = {"fused": fused, "switches": FusedOps.from_names(s.fused_switches).requested() if fused else [],
           "command": shlex.join(cmd), "global_batch_size": gbs,
           "features": read_features(records), "lm_losses": [r["lm_loss"] for r in records]}
    out.update(aggregate(records, warmup=s.warmup, tokens_per_step=gbs * seq_length(s, spec), world=s.nproc,
                         flops_per_token=flops(s, spec)))
    if profile and os.path.exists(profile):
        from aquila_npu.training.profile import load

        out["profile"] = load(profile)
    return out


def seq_length(s: Settings, spec: ModelSpec) -> int:
    return s.seq_length or spec.max_position_embeddings


def flops(s: Settings, spec: ModelSpec) -> float:
    """Model FLOPs per trained token, with the vocabulary padded as the training run pads it (to a multiple of
    tp, --make-vocab-size-divisible-by 1)."""
    return training_flops_per_token(spec, seq_length(s, spec), padded_vocab_size(spec.vocab_size, 1, s.tp))


def flagperf_flops(s: Settings, spec: ModelSpec) -> float:
    """FlagPerf's FLOPs per token: 6 x the parameters (embedding and output layer included), no attention term."""
    return flagperf_flops_per_token(spec.num_parameters(padded_vocab_size(spec.vocab_size, 1, s.tp)))


def settings_record(s: Settings, spec: ModelSpec, gbs: int) -> dict:
    padded = padded_vocab_size(spec.vocab_size, 1, s.tp)
    return {"model": s.model, "architecture": dataclasses.asdict(spec), "num_layers": spec.num_layers,
            "hidden_size": spec.hidden_size, "ffn_hidden_size": spec.intermediate_size,
            "num_attention_heads": spec.num_attention_heads, "num_query_groups": spec.num_key_value_heads,
            "vocab_size": spec.vocab_size, "padded_vocab_size": padded, "parameters": spec.num_parameters(padded),
            "seq_length": seq_length(s, spec), "micro_batch_size": s.micro_batch_size, "global_batch_size": gbs,
            "tensor_model_parallel_size": s.tp, "pipeline_model_parallel_size": s.pp,
            "data_parallel_size": s.nproc // (s.tp * s.pp), "nproc": s.nproc, "dtype": s.dtype,
            "warmup_iters": s.warmup, "iters": s.iters,
            "fused_switches": FusedOps.from_names(s.fused_switches).requested(), "extra_args": list(s.extra),
            "data": "--mock-data (random tokens)"}


def run_benchmark(s: Settings, *, fused_mode: str, log_dir: Optional[str] = None, label: Optional[str] = None,
                  echo=print) -> dict:
    """Measure the unfused and/or fused runs (``fused_mode`` off / on / both) on ``s.device`` and build the
    result record. Where the device cannot build the fused modules, ``both`` measures the unfused run only and
    says why; ``on`` is an error."""
    spec = model_spec(s.model, s.num_layers, s.seq_length)
    cannot_fuse = None
    if fused_mode != "off":
        cannot_fuse = environment.fused_unavailable(
            s.device, FusedOps.from_names(s.fused_switches))
        if cannot_fuse and fused_mode == "on":
            raise FusedKernelUnavailable(f"--fused on: {cannot_fuse}")
        if cannot_fuse:
            echo(f"benchmark: no fused run on {s.device}: {cannot_fuse}")
    variants = [False, True] if fused_mode == "both" and not cannot_fuse else [fused_mode == "on"]
    workdir = log_dir or tempfile.mkdtemp(prefix="aquila-bench-")
    os.makedirs(workdir, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    runs = {}
    for fused in variants:
        tag = "fused" if fused else "unfused"
        echo(f"benchmark: {tag} run, {s.warmup} warm-up + {s.iters} measured iterations")
        runs[tag] = measure(s, spec, fused, workdir, echo=echo)  # on failure the temporary logs stay
    overlap_run, no_overlap = None, None
    if fused_mode == "both":
        no_overlap = overlap_unavailable(s)
        if no_overlap:
            echo(f"benchmark: no overlap on/off comparison: {no_overlap}")
        else:  # the plain-kernel run again, with Megatron's communication overlap the other way round
            toggled = dataclasses.replace(s, extra=overlap_toggled(s.extra))
            echo(f"benchmark: unfused run with {' '.join(a for a in toggled.extra if a not in s.extra) or 'no'} "
                 f"overlap{' (off)' if '--overlap-grad-reduce' in s.extra else ''}, {s.warmup} warm-up + {s.iters} "
                 "measured iterations")
            overlap_run = measure(toggled, spec, False, workdir, echo=echo, tag="unfused-overlap-toggled")
    if not log_dir:
        shutil.rmtree(workdir, ignore_errors=True)
    device = environment.describe(s.device, s.nproc, s.peak_tflops)
    flagperf = flagperf_flops(s, spec)
    for r in [*runs.values(), *([overlap_run] if overlap_run else [])]:  # MFU once the device's peak is known
        r["mfu"] = r["tflops_per_device"] / device["peak_tflops"] if device["peak_tflops"] else None
        r["mfu_flagperf"] = (r["tokens_per_sec_per_device"] * flagperf / 1e12 / device["peak_tflops"]
                             if device["peak_tflops"] else None)  # FlagPerf's formula: 6 x params, no attention
    if label and device["is_cpu"] and "cpu" not in label.lower():
        label = f"CPU: {label}"  # CPU figures stay labelled as such
    result = {"schema": SCHEMA, "label": label or device["label"], "device": device,
              "software": environment.software(s.device),
              "settings": settings_record(s, spec, next(iter(runs.values()))["global_batch_size"]),
              "flops_per_token": flops(s, spec), "flops_formula": FORMULA,
              "flagperf_flops_per_token": flagperf, "flagperf_formula": FLAGPERF_FORMULA,
              "runs": runs, "fused_vs_unfused": None,
              "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "logs": workdir if log_dir else None}
    if fused_mode == "both":
        if cannot_fuse:
            result["fused_vs_unfused"] = {"available": False, "reason": cannot_fuse}
        else:
            ratio = runs["fused"]["tokens_per_sec_per_device"] / runs["unfused"]["tokens_per_sec_per_device"]
            result["fused_vs_unfused"] = {"available": True, "throughput_ratio": ratio}
        result["overlap_on_vs_off"] = overlap_ratio(runs["unfused"], overlap_run, no_overlap)
    return result


def overlap_unavailable(s: Settings) -> Optional[str]:
    """Why an overlap on/off comparison means nothing here, or None."""
    if s.nproc // (s.tp * s.pp) < 2:
        return (f"one data-parallel rank (--nproc {s.nproc} = tp {s.tp} x pp {s.pp}): no gradient reduction to "
                "overlap")
    return None


def overlap_ratio(plain: dict, toggled: Optional[dict], reason: Optional[str]) -> dict:
    """Throughput with Megatron's communication overlap on / off (the plain-kernel run and its toggled twin)."""
    if toggled is None:
        return {"available": False, "reason": reason}
    on, off = (toggled, plain) if toggled["features"]["overlap_grad_reduce"] else (plain, toggled)
    return {"available": True, "throughput_ratio": on["tokens_per_sec_per_device"] / off["tokens_per_sec_per_device"],
            "on_tokens_per_sec_per_device": on["tokens_per_sec_per_device"],
            "off_tokens_per_sec_per_device": off["tokens_per_sec_per_device"], "toggled_run": toggled}
