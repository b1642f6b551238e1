"""What the side-by-side benchmarks (``benchmarks/generate_bench.py --vs-hf``, ``benchmarks/eval_bench.py``) share:
shapes that are not Aquila2 models, a random Hugging Face model of a shape, and workers run in turn.

Each side of a comparison runs in its own process (HF's ``from_pretrained`` must not share a process with our CPU
set-up, see DEVELOPERS.md) and prints one ``RESULT {json}`` line. The sides alternate for several rounds, since the
machine may be shared; the load average is recorded around every run.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Dict, List, Optional, Sequence, Tuple

from aquila_npu.errors import BenchmarkFailed
from aquila_npu.models.registry import ModelSpec, get_model_spec
from aquila_npu.outputs.files import write_json

RESULT = "RESULT "
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# Shapes for benchmarks that are not Aquila2 models (so not in the model registry).
BENCH_SHAPES: Dict[str, ModelSpec] = {s.name: s for s in [
    # A 135M Llama-family model (SmolLM-135M's published shape: 30 layers, hidden 576, 9 query / 3 key-value heads,
    # FFN 1536, vocabulary 49152), untied here (as Aquila2; the same work per token).
    ModelSpec("smollm-135m", hidden_size=576, intermediate_size=1536, num_layers=30, num_attention_heads=9,
              num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
              pad_token_id=0, torch_dtype="float32", source="benchmark shape"),
    # A 160M Llama shape whose 12 heads split over two tensor-parallel ranks (the 135M shape's 9 do not): 12 layers,
    # hidden 768, 12 heads (no GQA), FFN 3072, vocabulary 32000.
    ModelSpec("llama-160m", hidden_size=768, intermediate_size=3072, num_layers=12, num_attention_heads=12,
              num_key_value_heads=12, vocab_size=32000, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
              pad_token_id=0, torch_dtype="float32", source="benchmark shape"),
    # A real pretrained checkpoint's shape with its own vocabulary (issue 28): TinyLlama-1.1B's published config (22
    # layers, hidden 2048, 32 query / 4 key-value heads, FFN 5632, vocabulary 32000, untied): the output layer is ~6% of
    # the parameters, as in real 1-7B models, where the 135M shape with the 100,008-token vocabulary makes it a third.
    ModelSpec("tinyllama-1.1b", hidden_size=2048, intermediate_size=5632, num_layers=22, num_attention_heads=32,
              num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
              pad_token_id=0, torch_dtype="float32", source="benchmark shape"),
]}


def get_shape(name: str) -> ModelSpec:
    """A ``BENCH_SHAPES`` entry or a registry architecture."""
    return BENCH_SHAPES.get(name) or get_model_spec(name)


def random_hf_model(spec: ModelSpec, folder: str, tokenizer_dir: Optional[str] = None) -> str:
    """A random ``LlamaForCausalLM`` of ``spec`` (the seeded weights of ``aquila_npu.weights.seeded``) saved in
    ``folder`` (kept when it is already there), with the tokenizer files of ``tokenizer_dir``."""
    from aquila_npu.checkpoint.hf_io import copy_tokenizer_files
    from aquila_npu.weights import seeded

    if not os.path.isdir(folder):
        seeded.hf_model(spec, seed=0).save_pretrained(folder)
        if tokenizer_dir:
            copy_tokenizer_files(tokenizer_dir, folder)
    return folder


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def worker_env(root: str, threads: Optional[int] = None, **extra: str) -> dict:
    """The environment of a worker: this checkout first on the path, no torch.distributed variables of ours."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(PYTHONPATH=root, PYTHONWARNINGS="ignore", **extra)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def print_result(result: dict) -> None:
    print(RESULT + json.dumps(result), flush=True)


def save_result(path: Optional[str], result: dict) -> None:
    """Write a benchmark's result as JSON (nothing without ``path``), with the machine and software it ran on."""
    if not path:
        return
    import platform

    from aquila_npu.benchmarking.environment import _version, cpu_model, software

    doc = dict(result, machine={"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()},
               software=dict(software("cpu"), transformers=_version("transformers"),
                             lm_eval=_version("lm_eval", "lm-eval")))
    write_json(path, doc, "the benchmark result", indent=1)
    print(f"wrote {path}")


def run_worker(cmd: Sequence[str], env: dict) -> dict:
    proc = subprocess.run(list(cmd), env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise BenchmarkFailed(f"worker failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT):])


def alternate(sides: Dict[str, Tuple[List[str], dict]], rounds: int) -> Tuple[Dict[str, List[dict]], List[float]]:
    """Run every side's (command, environment) once per round, in turn: the results per side, and the load average
    before the first run and after each."""
    runs: Dict[str, List[dict]] = {name: [] for name in sides}
    loads = [load_average()]
    for _ in range(rounds):
        for name, (cmd, env) in sides.items():
            runs[name].append(run_worker(cmd, env))
            loads.append(load_average())
    return runs, loads


def ratio_range(ratios: List[float]) -> str:
    """Ratios of several rounds as their range (never the best alone): ``1.21-1.40x (3 rounds)``."""
    if not ratios:
        return "n/a"
    lo, hi = min(ratios), max(ratios)
    return f"{lo:.2f}x" if len(ratios) == 1 else f"{lo:.2f}-{hi:.2f}x ({len(ratios)} rounds)"


def shape_out(path: Optional[str], shape: str, several: bool) -> Optional[str]:
    """The JSON path of one shape of a several-shape run (``X.json`` -> ``X-<shape>.json``)."""
    if not path or not several:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}-{shape}{ext or '.json'}"
