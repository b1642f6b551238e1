"""Start-up of ``python -m aquila_npu.generate``: from the shell to the first generated token, and where it goes.

    python benchmarks/eval_bench.py --rows 8 --work-dir /tmp/startup        # once: the 135M model, tp1 checkpoint
    python benchmarks/startup_bench.py --load /tmp/startup/mg-tp1-pp1 --hf-dir /tmp/startup/hf [--runs 3]

Each run is a fresh interpreter (``OMP_NUM_THREADS`` as given, else torch's default), in turn:

* the whole command, ``--max-new-tokens 1`` on one prompt (wall clock from the shell);
* ``--help`` (what a command costs before any model work: the parser imports neither torch nor megatron-core);
* with ``--baseline DIR``, the same command from another checkout of this project (e.g. ``git archive main | tar -x
  -C DIR``), for before / after figures;
* Hugging Face beside it: ``AutoTokenizer`` + ``AutoModelForCausalLM.from_pretrained`` + ``generate`` of one token on
  the same weights (``--hf-dir``);
* the phases of the command (the library calls ``cli.generate`` / ``Session.start`` make, timed one by one in one
  process): imports, arguments + checkpoint description, tokenizer, device + process group, model-parallel state +
  model build + weights (``load_model_for_inference``), first token.

Best and median of ``--runs`` for each, with the load average; ``--out`` writes them as JSON.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from aquila_npu.benchmarking.side_by_side import load_average, save_result, worker_env  # noqa: E402

PROMPT = "Hello world"


def phases(load: str, tokenizer: str) -> dict:
    """The calls of ``python -m aquila_npu.generate --max-new-tokens 1``, each timed (seconds per phase)."""
    marks = [("start", time.perf_counter())]

    def mark(name):
        marks.append((name, time.perf_counter()))

    import torch  # noqa: F401
    mark("import torch")
    from aquila_npu.compat.torch import import_megatron_core

    import_megatron_core()  # as the command imports it
    mark("import megatron.core")
    from aquila_npu.cli import generate as cli
    from aquila_npu.cli import inference_args
    from aquila_npu.inference.generation import TextGenerator
    from aquila_npu.inference.session import check
    mark("import aquila_npu (command, inference)")
    import transformers  # noqa: F401
    mark("import transformers")
    args = cli.build_parser().parse_args(["--load", load, "--tokenizer-name-or-path", tokenizer, "--prompt", PROMPT,
                                          "--max-new-tokens", "1", "--device", "cpu"])
    opts = inference_args.model_options(args)
    info = check(opts)
    mark("arguments + checkpoint description")
    from aquila_npu.data.tokenizer import load_tokenizer
    tok = load_tokenizer(opts.tokenizer, use_fast=opts.use_fast, tokenizer_type=opts.tokenizer_type)
    mark("tokenizer")
    from aquila_npu.device.setup import setup
    dev = setup(opts.device, opts.fused)
    mark("device + process group")
    from aquila_npu.checkpoint.load_model import load_model_for_inference
    loaded = load_model_for_inference(info, dev)
    mark("model-parallel state + model build + weights")
    gen = TextGenerator.from_loaded(loaded, dev.torch_device)
    gen.generate([tok.encode(PROMPT)], 1)
    mark("first token")
    torch.distributed.destroy_process_group()
    return {name: t - marks[i][1] for i, (name, t) in enumerate(marks[1:])}


HF_ONE_TOKEN = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = tok("Hello world", return_tensors="pt")
with torch.inference_mode():
    out = model.generate(**ids, do_sample=False, max_new_tokens=1)
print(tok.decode(out[0, ids["input_ids"].shape[1]:]))
"""


def wall(cmd, env) -> float:
    t0 = time.perf_counter()
    # From a neutral folder: ``python -m`` puts the working directory first on the path, ahead of PYTHONPATH, so
    # run from a checkout it would import that checkout whatever --baseline names.
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=os.path.sep)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--load", required=True, help="a tp1 Megatron checkpoint (eval_bench.py --work-dir writes one)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: --hf-dir)")
    p.add_argument("--hf-dir", required=True, help="the same model as a Hugging Face folder (with its tokenizer)")
    p.add_argument("--runs", type=int, default=3, help="fresh interpreters per measurement")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of every run (default: torch's)")
    p.add_argument("--baseline", default=None, metavar="DIR",
                   help="also run the 1-token command from this checkout of the project (before / after)")
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    p.add_argument("--phases-worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    # absolute: the commands run from a neutral folder (``wall``)
    a.load, a.hf_dir = os.path.abspath(a.load), os.path.abspath(a.hf_dir)
    tokenizer = os.path.abspath(a.tokenizer or a.hf_dir)
    if a.phases_worker:
        print("RESULT " + json.dumps(phases(a.load, tokenizer)))
        return
    env = worker_env(ROOT, a.threads)
    env.pop("PYTHONWARNINGS")  # what a user's shell has
    py = sys.executable
    commands = {
        "aquila_npu.generate, 1 token": [py, "-m", "aquila_npu.generate", "--load", a.load, "--tokenizer-name-or-path",
                                         tokenizer, "--prompt", PROMPT, "--max-new-tokens", "1", "--device", "cpu"],
        "aquila_npu.generate --help": [py, "-m", "aquila_npu.generate", "--help"],
        "HF transformers, 1 token": [py, "-c", HF_ONE_TOKEN, a.hf_dir],
    }
    envs = {name: env for name in commands}
    if a.baseline:
        name = f"baseline {a.baseline}, 1 token"
        commands[name] = commands["aquila_npu.generate, 1 token"]
        envs[name] = dict(env, PYTHONPATH=os.path.abspath(a.baseline))
    times = {name: [] for name in commands}
    steps = []
    loads = [load_average()]
    for _ in range(a.runs):
        for name, cmd in commands.items():
            times[name].append(wall(cmd, envs[name]))
            loads.append(load_average())
        proc = subprocess.run([py, os.path.abspath(__file__), "--phases-worker", "--load", a.load, "--hf-dir", a.hf_dir,
                               "--tokenizer", tokenizer], env=env, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"phases worker failed:\n{proc.stderr[-3000:]}")
        steps.append(json.loads(line[-1][len("RESULT "):]))
        loads.append(load_average())
    from aquila_npu.benchmarking.environment import cpu_model

    header = (f"startup_bench: {a.load}; {cpu_model()}, {os.cpu_count()} cores, OMP_NUM_THREADS "
              f"{a.threads or 'default'}; {a.runs} run(s) each, in turn; load average (1 min) {min(loads):.1f}.."
              f"{max(loads):.1f}; {time.strftime('%Y-%m-%d %H:%M')}")
    print(header)
    for name, ts in times.items():
        print(f"  {name:40s} best {min(ts):6.2f} s, median {statistics.median(ts):6.2f} s")
    best_phases = {name: min(s[name] for s in steps) for name in steps[0]}
    print("  phases of the command (best of the runs, one process):")
    for name, secs in best_phases.items():
        print(f"    {name:48s} {secs:6.2f} s")
    print(f"    {'sum':48s} {sum(best_phases.values()):6.2f} s")
    save_result(a.out, {"benchmark": "startup_bench", "summary": header, "runs": a.runs, "load_average": loads,
                        "seconds": times, "phases": steps, "phases_best": best_phases})


if __name__ == "__main__":
    main()
