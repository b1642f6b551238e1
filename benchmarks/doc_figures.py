"""The speed figures of README.md, README_zh.md and docs/*.md, generated from benchmarks/results/*.json.

Every figure the documents quote from a saved benchmark result sits between two HTML comments (invisible once the
Markdown is rendered)::

    ... greedy decoding <!-- figures:NAME -->1.40x / 1.44x HF<!-- /figures:NAME --> (batch 1 / 8) ...

    <!-- figures:NAME -->
    | a table | ... |

    <!-- /figures:NAME -->

NAME is a region of this script (`REGIONS`, one renderer each): it reads the JSON files the region names and returns
the text, with one template per language where the wording differs (README_zh.md is "zh", every other file "en"); the
numbers always come from the same JSON. A region whose opening marker ends its line is a block (a table: compared
line by line, blank lines around it ignored); any other is a fragment of a paragraph (compared with every run of
white space, line breaks included, counted as one space, so the paragraph can be re-wrapped freely).

    python benchmarks/doc_figures.py --check    # exit 1 and one line per region that differs from its JSON
    python benchmarks/doc_figures.py --write    # regenerate every region from the JSON
    python benchmarks/doc_figures.py --list     # the regions: documents and JSON files

To change a figure, re-run the benchmark (which rewrites its JSON) and then --write; never edit the figure by hand.
A figure measured without a saved JSON (or quoted from elsewhere) stays plain prose, outside any region.
Standard library only: the check runs without torch.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MARKER = re.compile(r"<!-- (/?)figures:([A-Za-z0-9_.-]*) -->")
REGION = re.compile(r"<!-- figures:(?P<name>[a-z0-9-]+) -->(?P<body>.*?)<!-- /figures:(?P=name) -->", re.DOTALL)

# The saved results the documents quote (benchmarks/results/). A re-run under a new name changes the name here.
GPU_BEFORE = "gpu-nvidia-h200-aquila2-7b-4l-seq4096-20261130.json"
GPU_AFTER = "gpu-nvidia-h200-aquila2-7b-4l-seq4096-20261130-after-issue14.json"
CUDA_BEFORE = "cuda-check-nvidia-h200-20261130.json"
CUDA_AFTER = "cuda-check-nvidia-h200-20261130-after-issue14.json"
CAUSAL_MASK = "causal-mask-cpu-aquila2-small-seq2048-20261130.json"
GENERATE_135M = "generate-vs-hf-cpu-amd-epyc-2-cores-smollm-135m-onednn-20261130.json"
GENERATE_160M = "generate-vs-hf-cpu-amd-epyc-2-cores-llama-160m-onednn-20261130.json"
GENERATE_135M_BEFORE = "generate-vs-hf-cpu-amd-epyc-2-cores-smollm-135m-20261130.json"
EVAL_BOOLQ = "eval-vs-lm-eval-cpu-amd-epyc-2-cores-smollm-135m-boolq100-onednn-20261130.json"
EVAL_MMLU = "eval-vs-lm-eval-cpu-amd-epyc-2-cores-smollm-135m-mmlu100-5shot-onednn-20261130.json"
EVAL_GSM8K = "eval-vs-lm-eval-cpu-amd-epyc-2-cores-smollm-135m-gsm8k30-32tok-onednn-20261130.json"
EVAL_BOOLQ_BEFORE = "eval-vs-lm-eval-cpu-amd-epyc-2-cores-smollm-135m-boolq100-20261130.json"
EVAL_MMLU_BEFORE = "eval-vs-lm-eval-cpu-amd-epyc-2-cores-smollm-135m-mmlu100-5shot-20261130.json"
EVAL_GSM8K_BEFORE = "eval-vs-lm-eval-cpu-amd-epyc-2-cores-smollm-135m-gsm8k30-32tok-20261130.json"
STARTUP = "startup-cpu-amd-epyc-2-cores-smollm-135m-aquila2-vocab-deferred-compile-20261130.json"
STARTUP_BEFORE = "startup-cpu-amd-epyc-2-cores-smollm-135m-aquila2-vocab-20261130.json"
LORA_FP32 = "lora-vs-full-aquila2-small-fp32-20261130.json"
LORA_BF16 = "lora-vs-full-aquila2-small-bf16-20261130.json"
PACK = "pack-vs-padded-cpu-amd-epyc-2-cores-aquila2-small-alpaca5000-20261207.json"
PLAN = "plan-vs-measured-cpu-20261208.json"
QLORA = "qlora-vs-lora-cpu-amd-epyc-2-cores-aquila2-7b-width-2l-bf16-20261208.json"


class FigureError(Exception):
    """A region that cannot be produced: a missing or unreadable JSON, a missing field, no template for a language."""


Text = str | dict  # one text for every language, or {"en": ..., "zh": ...}


@dataclass(frozen=True)
class Region:
    """A marked piece of the documents and how to produce it from its JSON files."""

    name: str
    sources: tuple
    render: Callable[..., Text]

    def text(self, lang: str, results: Results) -> str:
        """The region's text in `lang` ("en" or "zh"), rendered from the JSON files."""
        try:
            out = self.render(*(results.load(name) for name in self.sources))
        except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as err:
            raise FigureError(f"cannot compute it from the JSON ({type(err).__name__}: {err})") from err
        if isinstance(out, dict):
            if lang not in out:
                raise FigureError(f"no '{lang}' template in {Path(__file__).name}")
            out = out[lang]
        return out


REGIONS: dict = {}


def region(name: str, *sources: str):
    """Register the decorated renderer as region `name`, called with the loaded JSON of `sources` in order."""

    def add(render):
        if name in REGIONS:
            raise ValueError(f"two regions named {name}")
        REGIONS[name] = Region(name, sources, render)
        return render

    return add


class Results:
    """The JSON files of one results folder, each read once."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._loaded: dict = {}

    def load(self, name: str) -> dict:
        """The parsed JSON `name`; FigureError when it is missing or not JSON."""
        if name not in self._loaded:
            path = self.folder / name
            try:
                self._loaded[name] = json.loads(path.read_text(encoding="utf-8"))
            except OSError as err:
                raise FigureError(f"cannot read {path}: {err.strerror}") from err
            except json.JSONDecodeError as err:
                raise FigureError(f"{path} is not JSON: {err}") from err
        return self._loaded[name]


# ---- number formats (one place, so every document rounds alike) ----

def fixed(x: float, digits: int) -> str:
    """`x` with `digits` decimals."""
    return f"{x:.{digits}f}"


def times(x: float, digits: int = 2) -> str:
    """A ratio as the documents write it: 1.40x."""
    return f"{x:.{digits}f}x"


def bei(x: float, digits: int = 2) -> str:
    """A ratio in Chinese: 1.40 倍."""
    return f"{x:.{digits}f} 倍"


def sci(x: float, digits: int = 1) -> str:
    """Scientific notation without exponent padding: 2.4e-7."""
    mantissa, exponent = f"{x:.{digits}e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def pct(x: float, digits: int = 1) -> str:
    """A fraction as a percentage: 0.4304 -> 43.0%."""
    return f"{100 * x:.{digits}f}%"


def count(n: int) -> str:
    """An exact count with thousands separators: 53,975,296."""
    return f"{n:,}"


def load_span(*docs: dict) -> str:
    """The 1-minute load average recorded during the runs of `docs`, lowest..highest: 1.7..2.0."""
    values = [x for doc in docs for x in doc["load_average"]]
    return f"{min(values):.1f}..{max(values):.1f}"


def table(header: list, rows: list, spaced: bool = False) -> str:
    """A Markdown table; `spaced` writes the rule as "| --- |" instead of "|---|" (each document keeps its style)."""
    def line(cells):
        return "|" + "".join(f" {cell} |" if cell else " |" for cell in cells)

    rule = "| " + " | ".join(["---"] * len(header)) + " |" if spaced else "|" + "|".join(["---"] * len(header)) + "|"
    return "\n".join([line(header), rule] + [line(row) for row in rows])


# ---- training throughput: one NVIDIA H200 (aquila_npu.benchmark, benchmarks/cuda_check.py) ----

def tokens(run: dict) -> str:
    """A run's tokens per second per device, to the token."""
    return fixed(run["tokens_per_sec_per_device"], 0)


def unfused_gain(before: dict, after: dict) -> float:
    """Unfused tokens/s after issues 13 and 14 over before."""
    new, old = after["runs"]["unfused"], before["runs"]["unfused"]
    return new["tokens_per_sec_per_device"] / old["tokens_per_sec_per_device"]


@region("h200-causal-mask-gain", GPU_BEFORE, GPU_AFTER)
def _h200_causal_mask_gain(before, after):
    """README status: unfused H200 throughput after issues 13 and 14 over before (SDPA causal mode)."""
    return times(unfused_gain(before, after))


@region("h200-throughput", GPU_AFTER, GPU_BEFORE, CUDA_AFTER)
def _h200_throughput(after, before, check):
    """README's H200 sentence: throughput, MFU, fused ratio, measured GEMM, parity with HF and the CPU."""
    new, old, fused = after["runs"]["unfused"], before["runs"]["unfused"], after["runs"]["fused"]
    ratio = times(after["fused_vs_unfused"]["throughput_ratio"])
    gemm = fixed(check["limits"]["bf16_gemm_tflops"], 0)
    logits = sci(check["logits_vs_hf"]["fp32"]["max_abs_diff"])
    losses = sci(check["training_cpu_vs_cuda"]["fp32"]["max_rel_diff"])
    tflops, mfu = fixed(new["tflops_per_device"], 0), pct(new["mfu"])
    return {
        "en": f"**{tokens(new)} tokens/s, {tflops} TFLOP/s, MFU {mfu}** unfused "
              f"({tokens(old)} tokens/s, MFU {pct(old['mfu'])}, earlier the same day with an explicit mask); "
              f"{tokens(fused)} tokens/s with megatron-core's fused SwiGLU ({ratio}); a bf16 GEMM measured in the same "
              f"run reaches {gemm} TFLOP/s. In the same run the CUDA path matched HF logits (fp32 {logits}) and the "
              f"CPU's training losses (fp32 {losses} relative)",
        "zh": f"不融合 **{tokens(new)} tokens/s、{tflops} TFLOP/s、MFU {mfu}**"
              f"（同日早先使用显式 mask 时为 {tokens(old)} tokens/s、MFU {pct(old['mfu'])}）；使用 megatron-core "
              f"融合 SwiGLU 为 {tokens(fused)} tokens/s（{ratio}）；同一次运行中实测 bf16 GEMM 峰值 {gemm} TFLOP/s。"
              f"同一次运行中 CUDA 路径与 HF logits 一致（fp32 {logits}），训练 loss 与 CPU 一致（fp32 相对差 {losses}）",
    }


def logits_cell(check: dict, long: bool) -> str:
    """The logits-vs-HF result of a cuda_check JSON."""
    fp32, bf16 = check["logits_vs_hf"]["fp32"], check["logits_vs_hf"]["bf16"]
    agree = "argmax agreement" if long else "argmax"
    scale = f" (logits up to {fixed(bf16['ref_abs_max'], 2)})" if long else ""
    return (f"fp32: max abs diff {sci(fp32['max_abs_diff'])}, {agree} {pct(fp32['argmax_agree'], 0)}; "
            f"bf16: {sci(bf16['max_abs_diff'])}{scale}, argmax {pct(bf16['argmax_agree'])}")


def same_to_decimals(a: list, b: list, decimals: int) -> bool:
    """Whether two loss curves print the same with `decimals` decimals at every iteration."""
    return len(a) == len(b) and all(fixed(x, decimals) == fixed(y, decimals) for x, y in zip(a, b))


@region("cuda-check-table", CUDA_BEFORE)
def _cuda_check_table(check):
    """docs/benchmark.md: the first cuda_check run's checks (logits, losses, machine limits)."""
    fp32, bf16 = check["training_cpu_vs_cuda"]["fp32"], check["training_cpu_vs_cuda"]["bf16"]
    equal = " (equal to 6 decimals every iteration)" if same_to_decimals(fp32["cpu"], fp32["cuda"], 6) else ""
    limits = check["limits"]
    return table(["check", "result"], [
        ["logits vs HF `LlamaForCausalLM` (`aquila_npu.selfcheck --device cuda`, tiny random model)",
         logits_cell(check, long=True)],
        [f"training losses, one converted checkpoint, {len(fp32['cpu'])} iterations, `--device cpu` vs `--device cuda`",
         f"fp32: max relative difference {sci(fp32['max_rel_diff'])}{equal}; bf16: {sci(bf16['max_rel_diff'])}"],
        ["machine limits measured in the same run",
         (f"bf16 8192^3 GEMM {fixed(limits['bf16_gemm_tflops'], 0)} TFLOP/s; "
          f"device copy {fixed(limits['copy_gb_per_s'], 0)} GB/s (read + write)")],
    ], spaced=True)


@region("cuda-check-table-after", CUDA_AFTER, CUDA_BEFORE)
def _cuda_check_table_after(check, before):
    """docs/benchmark.md: the cuda_check checks after issues 13 and 14."""
    fp32, bf16 = check["training_cpu_vs_cuda"]["fp32"], check["training_cpu_vs_cuda"]["bf16"]
    logits = logits_cell(check, long=False)
    if logits == logits_cell(before, long=False):
        logits += " (unchanged)"
    limits = check["limits"]
    return table(["check", "result"], [
        ["logits vs HF", logits],
        [f"training losses, `--device cpu` vs `--device cuda`, {len(fp32['cpu'])} iterations",
         f"fp32: max relative difference {sci(fp32['max_rel_diff'])}; bf16: {sci(bf16['max_rel_diff'])}"],
        ["machine limits in the same run",
         (f"bf16 8192^3 GEMM {fixed(limits['bf16_gemm_tflops'], 0)} TFLOP/s; "
          f"device copy {fixed(limits['copy_gb_per_s'], 0)} GB/s")],
    ], spaced=True)


def throughput_table(result: dict, check: dict, mfu_header: str, labels: dict) -> str:
    """The tokens/p/s table of a benchmark JSON; `check` (its cuda_check JSON) gives the GEMM measured alongside."""
    gemm = check["limits"]["bf16_gemm_tflops"]
    rows = []
    for run_name, label in labels.items():
        run = result["runs"][run_name]
        rows.append([label, tokens(run), fixed(run["step_time_s"], 3),
                     fixed(run["tflops_per_device"], 0), pct(run["mfu"]), pct(run["tflops_per_device"] / gemm, 0),
                     fixed(run["peak_memory_gb"], 1)])
    peak = f"{result['device']['peak_tflops']:g}"
    header = ["kernels", "tokens/p/s", "s/step", "TFLOP/s/device", mfu_header.format(peak=peak),
              f"vs measured GEMM ({fixed(gemm, 0)})", "peak memory (GB)"]
    return table(header, rows, spaced=True)


@region("h200-throughput-table", GPU_BEFORE, CUDA_BEFORE)
def _h200_throughput_table(result, check):
    """docs/benchmark.md: the first H200 throughput table."""
    return throughput_table(result, check, "MFU (vs {peak} datasheet)", {
        "unfused": "unfused (plain modules, SDPA)", "fused": "fused SwiGLU (megatron-core's kernel)"})


@region("h200-throughput-table-after", GPU_AFTER, CUDA_AFTER)
def _h200_throughput_table_after(result, check):
    """docs/benchmark.md: the H200 throughput table after issues 13 and 14."""
    return throughput_table(result, check, "MFU (vs {peak})", {
        "unfused": "unfused (SDPA causal mode)", "fused": "fused SwiGLU"})


@region("h200-fused-ratio", GPU_BEFORE)
def _h200_fused_ratio(result):
    """docs/benchmark.md: fused / unfused throughput of the first H200 run."""
    return times(result["fused_vs_unfused"]["throughput_ratio"])


@region("h200-ratios-after", GPU_AFTER, GPU_BEFORE)
def _h200_ratios_after(after, before):
    """docs/benchmark.md: fused / unfused after issues 13 and 14, and unfused now / before."""
    return (f"{times(after['fused_vs_unfused']['throughput_ratio'])}; unfused now / unfused before: "
            f"{tokens(after['runs']['unfused'])} / {tokens(before['runs']['unfused'])} = "
            f"{times(unfused_gain(before, after))}")


# ---- one causal mask, before / after on the CPU (benchmarks/causal_mask_bench.py) ----

def memory_saving_mb(doc: dict) -> float:
    """Peak memory after minus before, in MB (decimal, as the JSON's GB)."""
    return (doc["summary"]["after"]["peak_memory_gb"] - doc["summary"]["before"]["peak_memory_gb"]) * 1000


@region("causal-mask-table", CAUSAL_MASK)
def _causal_mask_table(doc):
    """docs/benchmark.md: step time, peak memory and losses before / after the causal-mask change."""
    settings, summary, ratio = doc["settings"], doc["summary"], doc["after_over_before"]
    before_losses = doc["runs"]["before"][0]["lm_loss"]
    bitwise = all(run["lm_loss"] == before_losses for variant in doc["runs"].values() for run in variant)
    steps = settings["rounds"] * settings["iters"]
    return table(["", f"s/step (median of {steps} measured steps)",
                  f"peak memory ({summary['before']['peak_memory_kind']})", "losses"], [
        ["before: a mask per layer and micro-batch", fixed(summary["before"]["step_time_s"], 1),
         f"{summary['before']['peak_memory_gb']:.3f} GB",
         ", ".join(fixed(x, 5) for x in before_losses)],
        ["after: SDPA causal mode, no mask", fixed(summary["after"]["step_time_s"], 1),
         f"{summary['after']['peak_memory_gb']:.3f} GB",
         "the same, bit for bit" if bitwise else "different"],
        ["after / before", f"{times(ratio['step_time'])} (not a speed claim, see below)",
         f"**{times(ratio['peak_memory'], 3)} ({memory_saving_mb(doc):+.0f} MB)**",
         "equal" if doc["losses_equal"] else "different"],
    ], spaced=True)


@region("causal-mask-saving", CAUSAL_MASK)
def _causal_mask_saving(doc):
    """docs/benchmark.md: the peak memory saved, in all and per layer."""
    saved = -memory_saving_mb(doc)
    return f"{saved:.0f} MB, about {saved / doc['settings']['num_layers']:.0f} MB per layer"


@region("causal-mask-share", CAUSAL_MASK)
def _causal_mask_share(doc):
    """docs/benchmark.md: the saving as a share of the peak memory."""
    return pct(1 - doc["after_over_before"]["peak_memory"], 0)


@region("causal-mask-noise", CAUSAL_MASK)
def _causal_mask_noise(doc):
    """docs/benchmark.md: why the CPU step times are noise (load, step range, per-round ratios)."""
    runs = doc["runs"]
    steps = [t for variant in runs.values() for run in variant for t in run["step_times_s"]]
    rounds = [statistics.median(after["step_times_s"]) / statistics.median(before["step_times_s"])
              for before, after in zip(runs["before"], runs["after"])]
    if len(rounds) == 2:
        spread = (f"the second round's after / before was {times(rounds[1])} against the first round's "
                  f"{times(rounds[0])}")
    else:
        spread = "the rounds' after / before were " + ", ".join(times(r) for r in rounds)
    return (f"a load average of about {doc['device']['host']['load_average_1m']:.0f} during the run, single steps "
            f"took {min(steps):.0f} to {max(steps):.0f} s, and {spread}")


# ---- generation against Hugging Face (benchmarks/generate_bench.py --vs-hf) ----

def ratio_vs_hf(doc: dict, batch: int) -> float:
    """Our tokens/s at tp1 over HF's at `batch`, best rounds."""
    return doc["batches"][str(batch)]["ours tp1-pp1"]["ratio_vs_hf_best"]


@region("status-generate-vs-hf", GENERATE_135M)
def _status_generate_vs_hf(doc):
    """README status: greedy decoding vs HF at batch 1 / 8."""
    b1, b8 = ratio_vs_hf(doc, 1), ratio_vs_hf(doc, 8)
    return {"en": f"{times(b1)} / {times(b8)} HF", "zh": f"{fixed(b1, 2)} / {bei(b8)}"}


@region("generate-vs-hf-135m", GENERATE_135M)
def _generate_vs_hf_135m(doc):
    """README: greedy decoding vs HF `generate` at batch 1 and 8, 135M shape."""
    b1, b8 = ratio_vs_hf(doc, 1), ratio_vs_hf(doc, 8)
    return {"en": f"**{times(b1)} HF `generate`** at batch 1 and **{times(b8)}** at batch 8",
            "zh": f"batch 1 为 HF `generate` 的 **{bei(b1)}**，batch 8 为 **{bei(b8)}**"}


@region("generate-vs-hf-160m", GENERATE_160M)
def _generate_vs_hf_160m(doc):
    """README: the same for the 160M shape."""
    b1, b8 = ratio_vs_hf(doc, 1), ratio_vs_hf(doc, 8)
    return {"en": f"a 160M shape: {times(b1)} / {times(b8)}", "zh": f"160M 结构：{bei(b1)} / {bei(b8)}"}


@region("generate-vs-hf-load", GENERATE_135M, GENERATE_160M)
def _generate_vs_hf_load(*docs):
    """docs/inference.md: the load average during the two generation runs."""
    return load_span(*docs)


def generate_table(doc: dict, other_layout: str, other_header: str) -> str:
    """HF's tokens/s, ours at tp1 and at a two-process layout, per batch size."""
    rows = []
    for batch, sides in doc["batches"].items():
        hf, ours, other = sides["HF transformers"], sides["ours tp1-pp1"], sides[other_layout]
        rows.append([batch, f"{fixed(hf['tokens_per_s_best'], 1)} tokens/s",
                     (f"{fixed(ours['tokens_per_s_best'], 1)} tokens/s: **{times(ours['ratio_vs_hf_best'])}** "
                      f"(median {times(ours['ratio_vs_hf_median'])})"),
                     f"{fixed(other['tokens_per_s_best'], 1)}: {times(other['ratio_vs_hf_best'])}"])
    return table(["batch", "HF transformers", "ours tp1", other_header], rows)


@region("generate-vs-hf-135m-table", GENERATE_135M)
def _generate_vs_hf_135m_table(doc):
    """docs/inference.md: tokens/s against HF, 135M shape (tp1 and pp2)."""
    return generate_table(doc, "ours tp1-pp2", "ours pp2 (2 processes)")


@region("generate-vs-hf-160m-table", GENERATE_160M)
def _generate_vs_hf_160m_table(doc):
    """docs/inference.md: tokens/s against HF, 160M shape (tp1 and tp2)."""
    return generate_table(doc, "ours tp2-pp1", "ours tp2 (2 processes)")


@region("generate-vs-hf-before", GENERATE_135M_BEFORE)
def _generate_vs_hf_before(doc):
    """docs/inference.md: the ratios before oneDNN and the cached-key rotation."""
    return (f"load {load_span(doc)}) ours was {times(ratio_vs_hf(doc, 1))} at batch 1 and "
            f"{times(ratio_vs_hf(doc, 8))} at batch 8")


# ---- evaluation against lm-eval (benchmarks/eval_bench.py) ----

def speedup(doc: dict) -> float:
    """Our evaluation speed over lm-eval's `hf` backend."""
    return doc["speedup_vs_lm_eval"]


def predictions(doc: dict, lang: str, per_example: bool = False) -> str:
    """Whether our per-example predictions (or generations) equal lm-eval's, in `lang`."""
    if "identical_generations" in doc:
        same = doc["identical_generations"]
        return {"en": "identical generations" if same else "generations that differ",
                "zh": "生成文本完全一致" if same else "生成文本不完全一致"}[lang]
    same = doc["identical_predictions"]
    what = {"en": "per-example predictions" if per_example else "predictions", "zh": "逐条预测" if per_example else "预测"}
    return {"en": f"identical {what['en']}" if same else f"{what['en']} that differ",
            "zh": f"{what['zh']}完全一致" if same else f"{what['zh']}不完全一致"}[lang]


@region("status-eval-and-startup", EVAL_BOOLQ, EVAL_MMLU, EVAL_GSM8K, STARTUP)
def _status_eval_and_startup(boolq, mmlu, gsm8k, startup):
    """README status: evaluation speed-ups over lm-eval and the time to the first token."""
    first = fixed(best(startup, "aquila_npu.generate, 1 token"), 2)
    return {"en": f"BoolQ {times(speedup(boolq))}, MMLU {times(speedup(mmlu))}, GSM8K {times(speedup(gsm8k))} "
                  f"lm-eval, {first} s to the first token",
            "zh": f"BoolQ 为 lm-eval 的 {bei(speedup(boolq))}、MMLU {bei(speedup(mmlu))}、GSM8K {bei(speedup(gsm8k))}，"
                  f"首个 token {first} 秒"}


@region("eval-vs-lm-eval", EVAL_BOOLQ, EVAL_MMLU, EVAL_GSM8K)
def _eval_vs_lm_eval(boolq, mmlu, gsm8k):
    """README: BoolQ, MMLU and GSM8K against lm-eval, with what was identical."""
    en = (f"BoolQ, {boolq['rows']} real dev rows, **{times(speedup(boolq))} faster than lm-eval's `hf` backend** with "
          f"{predictions(boolq, 'en', per_example=True)} "
          f"(MMLU {mmlu['num_fewshot']}-shot, {mmlu['rows']} template-made rows in MMLU's layout: "
          f"**{times(speedup(mmlu))}**, {predictions(mmlu, 'en')}; GSM8K {gsm8k['num_fewshot']}-shot, {gsm8k['rows']} "
          f"template-made rows, {gsm8k['max_new_tokens']} new tokens: **{times(speedup(gsm8k))}**, "
          f"{predictions(gsm8k, 'en')})")
    zh = (f"BoolQ 真实 dev 集前 {boolq['rows']} 条，**比 lm-eval 的 `hf` 后端快 {bei(speedup(boolq))}**，"
          f"{predictions(boolq, 'zh', per_example=True)}（MMLU {mmlu['num_fewshot']}-shot，按 MMLU 数据格式由模板生成的 "
          f"{mmlu['rows']} 条：**{bei(speedup(mmlu))}**，{predictions(mmlu, 'zh')}；GSM8K {gsm8k['num_fewshot']}-shot，"
          f"模板生成的 {gsm8k['rows']} 条，最多 {gsm8k['max_new_tokens']} 个新 token：**{bei(speedup(gsm8k))}**，"
          f"{predictions(gsm8k, 'zh')}）")
    return {"en": en, "zh": zh}


@region("eval-vs-lm-eval-load", EVAL_BOOLQ, EVAL_MMLU, EVAL_GSM8K)
def _eval_vs_lm_eval_load(*docs):
    """docs/inference.md: the load average during the three evaluation runs."""
    return load_span(*docs)


def eval_row(doc: dict, label: str) -> list:
    """One task's row but its file: lm-eval's and our seconds (best round), the speed-up, what agreed. The speed-up
    is the JSON's own (eval_bench times the scoring phase alone), so it is not quite the ratio of the seconds shown."""
    seconds = doc["seconds"]
    if "identical_generations" in doc:
        same = (f"{doc['rows']}/{doc['rows']} generated texts identical" if doc["identical_generations"]
                else "generated texts differ")
    else:
        same = (f"{doc['rows']}/{doc['rows']} predictions" if doc["identical_predictions"] else "predictions differ")
        same += f", log-probs within {sci(doc['max_logprob_difference'])}"
    return [label, f"{fixed(min(seconds['lm-eval hf']), 1)} s", f"{fixed(min(seconds['ours']), 1)} s",
            f"**{times(speedup(doc))}**", same]


def best_of(doc: dict) -> str:
    """" (best of N rounds)" when the benchmark ran more than one round."""
    return f" (best of {doc['rounds']} rounds)" if doc["rounds"] > 1 else ""


@region("eval-vs-lm-eval-table", EVAL_BOOLQ, EVAL_MMLU, EVAL_GSM8K)
def _eval_vs_lm_eval_table(boolq, mmlu, gsm8k):
    """docs/inference.md: seconds, speed-up and agreement per task against lm-eval."""
    rows = [
        eval_row(boolq, f"BoolQ, real dev ({boolq['rows']}), log-likelihood{best_of(boolq)}") + [f"`{EVAL_BOOLQ}`"],
        eval_row(mmlu, f"MMLU layout ({mmlu['rows']}), {mmlu['num_fewshot']}-shot, log-likelihood{best_of(mmlu)}")
        + [f"`{EVAL_MMLU}`"],
        eval_row(gsm8k, f"GSM8K layout ({gsm8k['rows']}), {gsm8k['num_fewshot']}-shot, {gsm8k['max_new_tokens']} new "
                        f"tokens{best_of(gsm8k)}") + [f"`{EVAL_GSM8K}`"],
    ]
    return table(["task (rows)", "lm-eval `hf`", "ours", "speed-up", "same results",
                  "result file (`benchmarks/results/`)"], rows)


@region("eval-gsm8k-speedup", EVAL_GSM8K)
def _eval_gsm8k_speedup(doc):
    """docs/inference.md: GSM8K's speed-up after the cached-key rotation."""
    return times(speedup(doc))


@region("eval-vs-lm-eval-before", EVAL_GSM8K_BEFORE, EVAL_BOOLQ_BEFORE, EVAL_MMLU_BEFORE)
def _eval_vs_lm_eval_before(gsm8k, boolq, mmlu):
    """docs/inference.md: the earlier (loaded-machine) evaluation run."""
    return (f"load average {load_span(gsm8k, boolq, mmlu)} before either change, measured "
            f"{times(speedup(gsm8k))} GSM8K, {times(speedup(boolq))} BoolQ, {times(speedup(mmlu))} MMLU")


# ---- start-up (benchmarks/startup_bench.py) ----

def timings(doc: dict, prefix: str) -> list:
    """The seconds of the one command of a startup_bench JSON whose name starts with `prefix`."""
    (values,) = [v for k, v in doc["seconds"].items() if k.startswith(prefix)]
    return values


def best(doc: dict, prefix: str) -> float:
    """The fastest run of a command."""
    return min(timings(doc, prefix))


def median(doc: dict, prefix: str) -> float:
    """The median run of a command."""
    return statistics.median(timings(doc, prefix))


@region("startup-first-token", STARTUP)
def _startup_first_token(doc):
    """README: the 1-token generate from the shell, HF's, and --help."""
    ours, runs = "aquila_npu.generate, 1 token", doc["runs"]
    fastest, middle = fixed(best(doc, ours), 2), fixed(median(doc, ours), 2)
    hf, usage = fixed(best(doc, "HF transformers, 1 token"), 2), fixed(best(doc, "aquila_npu.generate --help"), 2)
    return {"en": f"**{fastest} s** best of {runs}, {middle} s median (HF's load + generate: {hf} s), `--help` {usage} s",
            "zh": f"**{fastest} 秒**（{runs} 次中最快，中位数 {middle} 秒；HF 加载加生成 {hf} 秒），`--help` {usage} 秒"}


@region("startup-load", STARTUP)
def _startup_load(doc):
    """docs/inference.md: the load average during the start-up run."""
    return load_span(doc)


@region("startup-table", STARTUP)
def _startup_table(doc):
    """docs/inference.md: best and median start-up of each command."""
    def cell(prefix, form="{} s"):
        return [form.format(fixed(best(doc, prefix), 2)), form.format(fixed(median(doc, prefix), 2))]

    # the baseline's commit (eb2cc7a) is not in the JSON: it is prose, kept in the label
    return table(["command", "best", "median"], [
        ["`aquila_npu.generate`, 1 token (this version)"] + cell("aquila_npu.generate, 1 token", "**{} s**"),
        ["the same from the commit before megatron-core's deferred decorations (`--baseline`, eb2cc7a)"]
        + cell("baseline "),
        ["Hugging Face: `AutoTokenizer` + `from_pretrained` + `generate` of 1 token"]
        + cell("HF transformers, 1 token"),
        ["`aquila_npu.generate --help`"] + cell("aquila_npu.generate --help"),
    ])


PHASES = {  # startup_bench's phase -> the table's label ({before}: the phase before megatron-core's deferral)
    "import torch": "`import torch`",
    "import megatron.core": "`import megatron.core` (its `torch.compile` decorations deferred; {before} s before)",
    "import aquila_npu (command, inference)": "the command and inference modules of aquila_npu",
    "import transformers": "`import transformers`",
    "arguments + checkpoint description": "arguments + checkpoint description (read once)",
    "tokenizer": "tokenizer (`AutoTokenizer.from_pretrained`: transformers 5 parses tokenizer.json and rebuilds the "
                 "BPE from vocab.json / merges.txt in Python)",
    "device + process group": "device + process group (gloo)",
    "model-parallel state + model build + weights": "model-parallel state + model build + weights",
    "first token": "first token (prefill + choice)",
}


@region("startup-phases-table", STARTUP, STARTUP_BEFORE)
def _startup_phases_table(doc, before):
    """docs/inference.md: where the start-up time goes, best of each phase, and their sum."""
    phases, old = doc["phases_best"], before["phases_best"]
    rows = [[label.format(before=fixed(old[key], 1)), fixed(phases[key], 2)] for key, label in PHASES.items()]
    rows.append(["**sum**", f"**{fixed(sum(phases.values()), 2)}**"])
    return table(["phase", "seconds"], rows)


@region("startup-target", STARTUP)
def _startup_target(doc):
    """docs/inference.md: the start-up against the issue's 4 s target."""
    gen = "aquila_npu.generate, 1 token"
    return f"best {fixed(best(doc, gen), 2)} s, median {fixed(median(doc, gen), 2)} s"


@region("startup-model-build", STARTUP)
def _startup_model_build(doc):
    """docs/inference.md: model build and weights."""
    return f"model build and weights {fixed(doc['phases_best']['model-parallel state + model build + weights'], 1)} s"


@region("startup-help", STARTUP)
def _startup_help(doc):
    """docs/inference.md: `generate --help`."""
    return f"{fixed(best(doc, 'aquila_npu.generate --help'), 2)} s"


@region("startup-correction", STARTUP_BEFORE)
def _startup_correction(doc):
    """docs/inference.md: the figures published before the neutral-folder fix."""
    return f"{fixed(best(doc, 'baseline '), 2)} s before, {fixed(best(doc, 'aquila_npu.generate, 1 token'), 2)} s after"


# ---- LoRA against full fine-tuning (benchmarks/lora_bench.py) ----

def lora_rows(doc: dict) -> list:
    """Three rows (trainable parameters, optimizer bytes, fastest step) of one lora_bench JSON."""
    full, lora, ratio = doc["full"], doc["lora"], doc["lora_over_full"]
    adapters = [d.split()[1] for d in lora["dtypes"] if d.startswith("adapter ")]
    adapter = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(adapters[0], adapters[0])
    label = doc["dtype"] if adapter == doc["dtype"] else f"{doc['dtype']} (adapters {adapter})"
    return [
        [label, "trainable parameters", count(full["trainable_parameters"]), count(lora["trainable_parameters"]),
         fixed(ratio["trainable_parameters"], 4)],
        ["", "optimizer state (bytes)", count(full["optimizer_state_bytes_rank0"]),
         count(lora["optimizer_state_bytes_rank0"]), fixed(ratio["optimizer_state_bytes_rank0"], 4)],
        ["", "step time (s)", fixed(full["step_time_min_s"], 3), fixed(lora["step_time_min_s"], 3),
         fixed(ratio["step_time_min_s"], 2)],
    ]


@region("lora-vs-full-table", LORA_FP32, LORA_BF16)
def _lora_vs_full_table(fp32, bf16):
    """docs/training.md: parameters, optimizer bytes and step time, LoRA against full fine-tuning."""
    return table(["base dtype", "", "full fine-tuning", "LoRA", "LoRA / full"], lora_rows(fp32) + lora_rows(bf16))


# ---- packed against padded fine-tuning (benchmarks/pack_bench.py) ----

def pack_run(doc: dict, seq: str) -> dict:
    """One --seq-length's packed and padded runs."""
    return doc["by_seq_length"][seq]


def pack_ratio(doc: dict, seq: str) -> str:
    """Packed over padded response tokens/s at `seq` (overall), and the per-iteration range."""
    run = pack_run(doc, seq)
    low, high = run["per_iteration_ratio_range"]
    return times(run["packed_over_padded_response_tokens_per_s"], 1), f"{times(low, 1)}..{times(high, 1)}"


def pack_bound(doc: dict, seq: str) -> str:
    """The limit of the ratio at `seq`: the positions a padded step computes over a packed step's (same length)."""
    run = pack_run(doc, seq)
    return times(run["padded"]["global_batch_size"] / run["packed"]["global_batch_size"], 0)


@region("pack-status", PACK)
def _pack_status(doc):
    """README status: packed over padded response tokens/s at 2048 and 512."""
    (a, _), (b, _) = pack_ratio(doc, "2048"), pack_ratio(doc, "512")
    return {"en": f"{a} / {b} the padded layout's response tokens/s at --seq-length 2048 / 512",
            "zh": f"--seq-length 2048 / 512 时响应 token/s 为填充布局的 {a} / {b}"}


@region("pack-summary", PACK)
def _pack_summary(doc):
    """README training section and docs/training.md: the ratios, their per-iteration ranges, the machine's load."""
    (a, ra), (b, rb) = pack_ratio(doc, "2048"), pack_ratio(doc, "512")
    la, lb = pack_bound(doc, "2048"), pack_bound(doc, "512")
    load = f"{doc['load_before']:.1f}..{doc['load_after']:.1f}"
    return {"en": f"{a} at --seq-length 2048 ({ra} iteration by iteration; a packed step computes {la} fewer "
                  f"positions, the ratio's limit) and {b} at 512 ({rb}; limit {lb}); load average {load} on the 2 "
                  "cores",
            "zh": f"--seq-length 2048 时 {a}（逐迭代 {ra}；打包后每步计算的位置少 {la}，即该比值的上限），512 时 {b}"
                  f"（{rb}；上限 {lb}）；2 核上的负载均值 {load}"}


@region("pack-table", PACK)
def _pack_table(doc):
    """docs/training.md: response tokens/s, attention share, peak memory and fill of both layouts per --seq-length."""
    rows = []
    for seq in sorted(doc["by_seq_length"], key=int, reverse=True):
        run = pack_run(doc, seq)
        for layout in ("padded", "packed"):
            r = run[layout]
            low, high = r["response_tokens_per_s_range"]
            per_seq = fixed(run["samples_per_sequence_packed"], 1) if layout == "packed" else "1"
            ratio = pack_ratio(doc, seq)[0] if layout == "packed" else ""
            rows.append([seq if layout == "padded" else "", layout, str(r["global_batch_size"]), per_seq,
                         f"{fixed(r['response_tokens_per_s'], 0)} ({fixed(low, 0)}..{fixed(high, 0)})",
                         pct(r["attention_share"]), fixed(r["peak_rss_gb"], 1), ratio])
    return table(["--seq-length", "layout", "sequences per step", "samples per sequence",
                  "response tokens/s (range)", "attention share of a step", "peak RSS (GB)", "packed / padded"], rows)


QLORA_RUNS = ("full", "lora", "qlora")


def qlora_rows(doc, detailed: bool):
    """The rows of the QLoRA / LoRA / full fine-tuning comparison (benchmarks/qlora_bench.py)."""
    runs = [doc[k] for k in QLORA_RUNS]

    def row(label, key, show, zh):
        cells = [label] + [show(r[key]) for r in runs]
        if detailed:
            r = doc["qlora"][key] / doc["lora"][key]
            cells.append("1" if r == 1 else fixed(r, 2))
        return cells, zh

    rows = [row("base linears, bytes per parameter", "base_bytes_per_parameter",
                lambda x: f"{x:.4f}".rstrip("0").rstrip(".") if x != 2 else "2.0", "基座线性层每参数字节数")]
    if detailed:
        rows.append(row("base linears (bytes)", "base_linear_bytes", count, None))
    rows.append(row("process peak (resident set, GiB)" if detailed else "process peak (GiB)", "peak_rss_bytes",
                    lambda x: fixed(x / 2**30, 2), "进程内存峰值（GiB）"))
    rows.append(row("trainable parameters", "trainable_parameters", count, "可训练参数"))
    if detailed:
        rows.append(row("optimizer state (bytes)", "optimizer_state_bytes", count, None))
    rows.append(row("step time, median (s)", "step_time_median_s", lambda x: fixed(x, 2), "单步时间中位数（秒）"))
    return rows


@region("qlora-table", QLORA)
def _qlora_table(doc):
    """docs/training.md: bytes, peak, optimizer state and step time of full / LoRA / QLoRA, and QLoRA / LoRA."""
    return table(["", "full fine-tuning", "LoRA", "QLoRA", "QLoRA / LoRA"],
                 [cells for cells, _ in qlora_rows(doc, True)])


@region("qlora-summary", QLORA)
def _qlora_summary(doc):
    """README / README_zh: the same comparison, short."""
    rows = qlora_rows(doc, False)
    return {"en": table(["", "full fine-tuning", "LoRA", "QLoRA"], [cells for cells, _ in rows]),
            "zh": table(["", "全参微调", "LoRA", "QLoRA"], [[zh, *cells[1:]] for cells, zh in rows])}


@region("plan-vs-measured", PLAN)
def plan_table(doc):
    """docs/benchmark.md: the layout planner's predicted memory per part vs the peak measured (MiB per process);
    benchmarks/plan_bench.py prints the same table."""
    def mib(n):
        return fixed(n / 2**20, 1)

    rows = [[r["layout"], str(r["processes"]), str(r["stage"]),
             *(mib(r["parts"][k]) for k in ("weights", "gradients", "optimizer", "activations", "transient")),
             mib(r["predicted_bytes"]), mib(r["measured_bytes"]), f"{100 * r['error']:+.1f}%",
             mib(r.get("measured_max_bytes", r["measured_bytes"]))] for r in doc["rows"]]
    return table(["layout", "processes", "stage", "weights", "grads", "optimizer", "activations", "transient",
                  "predicted", "measured", "error", "largest rank"], rows)


# ---- issue 28: generation and evaluation as ranges over rounds, on two shapes ----
GEN_RANGE_135M = "generate-vs-hf-cpu-amd-epyc-2-cores-smollm-135m-rounds3-20261208.json"
GEN_RANGE_1B = "generate-vs-hf-cpu-amd-epyc-2-cores-tinyllama-1.1b-rounds3-20261208.json"
EVAL_RANGE_135M = "eval-vs-lm-eval-cpu-amd-epyc-2-cores-smollm-135m-boolq100-rounds3-20261208.json"
EVAL_RANGE_1B = "eval-vs-lm-eval-cpu-amd-epyc-2-cores-tinyllama-1.1b-aquila2-vocab-boolq20-rounds2-20261208.json"


def generate_rounds(doc: dict, batch: int = 1) -> list:
    """Ours (tp1) over HF per round at `batch`: each round's best run of both sides."""
    sides = doc["batches"][str(batch)]
    return [min(hf) / min(ours) for hf, ours in zip(sides["HF transformers"]["seconds"],
                                                     sides["ours tp1-pp1"]["seconds"])]


def eval_rounds(doc: dict) -> list:
    """lm-eval's time over ours per round (rows to predictions)."""
    return [hf / ours for hf, ours in zip(doc["seconds"]["lm-eval hf"], doc["seconds"]["ours"])]


def span(ratios: list) -> str:
    """Per-round ratios as their range: 0.93-1.35x."""
    return f"{fixed(min(ratios), 2)}-{times(max(ratios))}"


def span_zh(ratios: list) -> str:
    return f"{fixed(min(ratios), 2)}-{bei(max(ratios))}"


@region("inference-ranges-table", GEN_RANGE_135M, GEN_RANGE_1B, EVAL_RANGE_135M, EVAL_RANGE_1B)
def _inference_ranges_table(g135, g1b, e135, e1b):
    """docs/inference.md: every comparison on both shapes, the range over the rounds, the load average."""
    rows = []
    for what, shape, doc in (("greedy decoding, batch 1, 32 new tokens: ours tp1 / HF `generate`",
                              "135M shape, vocabulary 49,152", g135),
                             ("", "TinyLlama-1.1B's shape, its vocabulary 32,000", g1b)):
        same = doc["batches"]["1"]["ours tp1-pp1"]["same_tokens_as_hf"]
        rows.append([what, shape, len(generate_rounds(doc)), f"**{span(generate_rounds(doc))}**",
                     "same tokens" if same else "tokens differ", load_span(doc)])
    for what, shape, doc in ((f"BoolQ dev, first {e135['rows']} rows, log-likelihood: lm-eval `hf` time / ours",
                              "135M shape, Aquila2 vocabulary 100,008", e135),
                             (f"the same, first {e1b['rows']} rows", "TinyLlama-1.1B's width, vocabulary 100,008",
                              e1b)):
        rows.append([what, shape, len(eval_rounds(doc)), f"**{span(eval_rounds(doc))}**",
                     f"{'same' if doc['identical_predictions'] else 'different'} predictions",
                     load_span(doc)])
    return table(["comparison", "shape", "rounds", "range over the rounds", "outputs", "load average (1 min)"], rows,
                 spaced=True)


@region("status-inference-ranges", GEN_RANGE_135M, GEN_RANGE_1B, EVAL_RANGE_135M, EVAL_RANGE_1B)
def _status_inference_ranges(g135, g1b, e135, e1b):
    """README: the ranges of issue 28 (two shapes, several rounds, one shared machine)."""
    g1, g2, e1, e2 = generate_rounds(g135), generate_rounds(g1b), eval_rounds(e135), eval_rounds(e1b)
    return {"en": (f"greedy decoding at batch 1 {span(g1)} HF `generate` (135M shape) and {span(g2)} (TinyLlama-1.1B's "
                   f"shape and vocabulary); BoolQ scoring {span(e1)} lm-eval (135M shape) and {span(e2)} (1.1B width), "
                   f"ranges over the rounds on one shared 2-core AMD EPYC"),
            "zh": (f"batch 1 贪心解码为 HF `generate` 的 {span_zh(g1)}（135M 结构）与 {span_zh(g2)}（TinyLlama-1.1B "
                   f"的结构与词表）；BoolQ 打分为 lm-eval 的 {span_zh(e1)}（135M 结构）与 {span_zh(e2)}（1.1B 宽度），"
                   f"均为同一台共享 2 核 AMD EPYC 上各轮的范围")}


# ---- the documents ----

def documents(root: Path) -> list:
    """The Markdown files whose figures this script owns: README.md, README_zh.md, docs/*.md."""
    found = [root / "README.md", root / "README_zh.md"] + sorted((root / "docs").glob("*.md"))
    return [path for path in found if path.is_file()]


def language(path: Path) -> str:
    """The language of a document's templates: "zh" for *_zh.md, else "en"."""
    return "zh" if path.stem.endswith("_zh") else "en"


def is_block(body: str) -> bool:
    """A region whose opening marker ends its line (a table), rather than a fragment of a paragraph."""
    return body.startswith("\n")


def same_text(body: str, text: str) -> bool:
    """Whether a region's current body says `text`: blocks line by line, fragments up to white space."""
    if is_block(body):
        return body.strip("\n") == text.strip("\n")
    return body.split() == text.split()


def wrapped_like(old: str, new: str) -> str:
    """`new` broken into lines where `old` was (same word positions), so a re-wrapped paragraph keeps its shape."""
    old_words, new_words = old.split(), new.split()
    if "\n" not in old or len(old_words) != len(new_words) or not new_words:
        return new
    separators = re.findall(r"\s+", old.strip())
    out = [new_words[0]]
    for separator, word in zip(separators, new_words[1:]):
        out += ["\n" if "\n" in separator else " ", word]
    return "".join(out)


def new_body(body: str, text: str) -> str:
    """The body `--write` puts between a region's markers."""
    if is_block(body):
        return "\n" + text.strip("\n") + "\n\n"  # the blank line ends a table before the closing marker
    return wrapped_like(body, text)


def difference(body: str, text: str) -> list:
    """What --diff shows, indented: a fragment's document and JSON texts; a block's lines that differ (-/+)."""
    if not is_block(body):
        return [f"    document: {' '.join(body.split())}", f"    JSON:     {' '.join(text.split())}"]
    lines = difflib.ndiff(body.strip("\n").split("\n"), text.strip("\n").split("\n"))
    return [f"    {line}" for line in lines if line.startswith(("- ", "+ "))]


def marker_problems(rel: str, text: str) -> list:
    """Markers that pair wrongly or break the Markdown: an unpaired or misnamed marker; a marker at the start of a line
    with text after it (Markdown reads an HTML block there, which swallows the rest of the line)."""
    paired = set()
    for match in REGION.finditer(text):
        paired |= {match.start(), match.end() - len(f"<!-- /figures:{match['name']} -->")}
    problems = []
    for match in MARKER.finditer(text):
        name = match.group(2)
        if match.start() not in paired:
            problems.append(f"{rel}: {name}: '{match.group(0)}' has no matching marker (names: a-z, 0-9, '-')")
            continue
        line_start = text.rfind("\n", 0, match.start()) + 1
        line_end = text.find("\n", match.end())
        line = text[line_start:] if line_end < 0 else text[line_start:line_end]
        if not text[line_start:match.start()].strip() and line.strip() != match.group(0):
            problems.append(f"{rel}: {name}: '{match.group(0)}' starts a line with text after it (Markdown would "
                            "read an HTML block): put a word before it, or the marker alone on its line")
    return problems


@dataclass
class Outcome:
    """What one pass over the documents found: problem lines, regions rewritten, region names seen."""

    problems: list = field(default_factory=list)
    rewritten: list = field(default_factory=list)
    seen: set = field(default_factory=set)


class Pass:
    """One pass over the documents of `root` against the JSON files of `results_dir`: compare, or rewrite."""

    def __init__(self, root: Path, results_dir: Path, write: bool = False, diff: bool = False):
        self.root, self.results = Path(root), Results(results_dir)
        self.write, self.diff = write, diff
        self.outcome = Outcome()

    def sources(self, spec: Region) -> str:
        """The region's JSON files, named relative to the root when they lie under it."""
        try:
            folder = self.results.folder.resolve().relative_to(self.root.resolve())
        except ValueError:
            folder = self.results.folder
        return ", ".join(str(folder / name) for name in spec.sources)

    def region(self, rel: str, lang: str, match: re.Match) -> str:
        """The text a marked region should have (its current text when it agrees or cannot be produced)."""
        name, body, problems = match["name"], match["body"], self.outcome.problems
        self.outcome.seen.add(name)
        spec = REGIONS.get(name)
        if spec is None:
            problems.append(f"{rel}: {name}: not a region of benchmarks/doc_figures.py")
            return match.group(0)
        try:
            expected = spec.text(lang, self.results)
        except FigureError as err:
            problems.append(f"{rel}: {name}: {err} ({self.sources(spec)})")
            return match.group(0)
        if same_text(body, expected):
            return match.group(0)
        if self.write:
            self.outcome.rewritten.append(f"{rel}: {name}")
            return f"<!-- figures:{name} -->{new_body(body, expected)}<!-- /figures:{name} -->"
        problems.append(f"{rel}: {name}: differs from {self.sources(spec)}")
        if self.diff:
            problems += difference(body, expected)
        return match.group(0)

    def document(self, path: Path) -> None:
        """Compare (or rewrite) every region of one document."""
        rel, lang = path.relative_to(self.root).as_posix(), language(path)
        text = path.read_text(encoding="utf-8")
        self.outcome.problems += marker_problems(rel, text)
        updated = REGION.sub(lambda match: self.region(rel, lang, match), text)
        if self.write and updated != text:
            path.write_text(updated, encoding="utf-8")

    def run(self) -> Outcome:
        """Every document, then every region that no document marks."""
        for path in documents(self.root):
            self.document(path)
        for name in sorted(set(REGIONS) - self.outcome.seen):
            self.outcome.problems.append(f"(no document): {name}: a region of benchmarks/doc_figures.py that no "
                                         f"document marks ({self.sources(REGIONS[name])})")
        return self.outcome


def check(root: Path = ROOT, results_dir: Path | None = None, diff: bool = False) -> list:
    """The problems `--check` reports, one line each (empty: every marked figure says what its JSON says)."""
    results_dir = Path(root) / "benchmarks" / "results" if results_dir is None else results_dir
    return Pass(root, results_dir, diff=diff).run().problems


def write(root: Path = ROOT, results_dir: Path | None = None) -> Outcome:
    """Regenerate every marked region from its JSON; the outcome names the regions rewritten and any problems."""
    results_dir = Path(root) / "benchmarks" / "results" if results_dir is None else results_dir
    return Pass(root, results_dir, write=True).run()


def listing(root: Path = ROOT) -> list:
    """One line per marked region: document, region, JSON files."""
    lines = []
    for path in documents(Path(root)):
        for match in REGION.finditer(path.read_text(encoding="utf-8")):
            spec = REGIONS.get(match["name"])
            sources = ", ".join(spec.sources) if spec else "(not a region of this script)"
            lines.append(f"{path.relative_to(root).as_posix()}: {match['name']}: {sources}")
    return lines


def main(argv=None) -> int:
    """Command line: --check (exit 1 when a region differs or a marker is wrong), --write, --list."""
    parser = argparse.ArgumentParser(
        prog="doc_figures.py",
        description="Generate the speed figures of README.md, README_zh.md and docs/*.md from "
                    "benchmarks/results/*.json (the regions between <!-- figures:NAME --> and "
                    "<!-- /figures:NAME -->), or check that they agree. Edit the JSON (re-run the benchmark), "
                    "never the figure.")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true",
                      help="print one line (document, region, JSON) per region that differs; exit 1 if any")
    mode.add_argument("--write", action="store_true", help="regenerate every region from its JSON")
    mode.add_argument("--list", action="store_true", help="list the marked regions and their JSON files")
    parser.add_argument("--diff", action="store_true",
                        help="with --check: also show the document's and the JSON's text")
    parser.add_argument("--root", type=Path, default=ROOT,
                        help="the repository whose documents are read (default: this script's, %(default)s)")
    parser.add_argument("--results", type=Path, default=None,
                        help="the folder of result JSON files (default: ROOT/benchmarks/results)")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(listing(args.root)))
        return 0
    if args.write:
        outcome = write(args.root, args.results)
        problems = outcome.problems
        print("\n".join(f"rewritten: {line}" for line in outcome.rewritten) or "doc_figures: nothing to rewrite")
    else:
        problems = check(args.root, args.results, diff=args.diff)
    for line in problems:
        print(line)
    if problems:
        count_ = sum(not line.startswith("    ") for line in problems)
        print(f"doc_figures: {count_} problem(s). The JSON is the source: re-run the benchmark, then "
              "`python benchmarks/doc_figures.py --write`; never edit a figure by hand", file=sys.stderr)
        return 1
    if args.check:
        print(f"doc_figures: all {len(listing(args.root))} marked regions agree with their JSON")
    return 0


if __name__ == "__main__":
    sys.exit(main())
