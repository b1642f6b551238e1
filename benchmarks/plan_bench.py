"""The layout planner's memory model against torch's allocator: every CPU layout of
``aquila_npu.benchmarking.memory.CPU_LAYOUTS`` trained for 3 iterations under torchrun, each rank's peak of allocated
memory measured (torch's profiler sees every allocation and free of the CPU allocator), set beside the planner's
prediction of its pipeline stage, and the planner's answers at ModelLink's Aquila2 settings.

    python benchmarks/plan_bench.py [--layouts tiny-tp1,small-tp2-sp] [--out benchmarks/results/plan-vs-measured-cpu-DATE.json]
    python benchmarks/plan_bench.py --table benchmarks/results/plan-vs-measured-cpu-20261208.json

Prints the markdown table of docs/benchmark.md ("Memory plan"); ``--table`` prints it from a saved result. (Internally it starts itself under torchrun with
``--worker DIR -- <pretrain flags>`` for each layout.)
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def worker(out_dir, argv):
    import torch

    from aquila_npu.benchmarking.memory import measure
    from aquila_npu.cli.pretrain import main as pretrain

    torch.set_num_threads(1)
    return measure(lambda: pretrain(argv), out_dir)


def main():
    if "--worker" in sys.argv:
        i = sys.argv.index("--worker")
        return worker(sys.argv[i + 1], sys.argv[sys.argv.index("--") + 1:])
    from aquila_npu import launch
    from aquila_npu.benchmarking.memory import CPU_LAYOUTS, RUN_FLAGS, compare, measured
    from aquila_npu.cli.pretrain import parse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", default=",".join(CPU_LAYOUTS))
    p.add_argument("--out", default=None)
    p.add_argument("--workdir", default="/tmp/plan_bench")
    p.add_argument("--table", default=None, metavar="JSON", help="print the table of a saved result, run nothing")
    args = p.parse_args()
    if args.table:
        with open(args.table) as f:
            return table(json.load(f)["rows"])
    rows = []
    for name in args.layouts.split(","):
        nproc, flags = CPU_LAYOUTS[name]
        argv = RUN_FLAGS + flags
        out = os.path.join(args.workdir, name)
        os.makedirs(out, exist_ok=True)
        cmd = [*launch.torchrun(nproc), os.path.abspath(__file__), "--worker", out, "--", *argv]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"{name} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
        for st in compare(parse(argv), nproc, measured(out)):
            rows.append({"layout": name, "processes": nproc, "flags": " ".join(flags), **st})
            print(f"{name} stage {st['stage']}: predicted {st['predicted_bytes'] / 2**20:.1f} MiB, measured "
                  f"{st['measured_bytes'] / 2**20:.1f} MiB ({st['error']:+.1%})", flush=True)
    date = datetime.date.today().strftime("%Y%m%d")
    path = args.out or os.path.join(ROOT, "benchmarks", "results", f"plan-vs-measured-cpu-{date}.json")
    with open(path, "w") as f:
        json.dump({"date": date, "machine": platform.processor() or platform.machine(), "rows": rows}, f, indent=1)
    print(f"wrote {path}\n")
    table(rows)


def table(rows):
    """The table of docs/benchmark.md, rendered by doc_figures (its region ``plan-vs-measured``)."""
    from doc_figures import plan_table

    print(plan_table({"rows": rows}))


if __name__ == "__main__":
    sys.exit(main())
