"""``python -m aquila_npu.selfcheck``: the logits check (``checks.logits``), or the first-hour report of a node
(``checks.report``: every check in child processes, one report). A check that ran and failed ends with
``CheckFailed`` (exit status 1) after its result is printed and written."""

from __future__ import annotations

import os

from aquila_npu.errors import CheckFailed, UsageError
from aquila_npu.outputs.files import write_json


def run(args) -> int:
    if args.compare:  # two runs' --layer-stats files: where they part (no device needed)
        from aquila_npu.checks import drift

        return drift.run(args)
    from aquila_npu.device.setup import resolve

    first_hour = not (args.logits_only or args.load or "RANK" in os.environ) and resolve(args.device) == "npu"
    if args.report or first_hour:  # what an operator runs first on an Atlas node: python -m aquila_npu.selfcheck
        return report(args)
    from aquila_npu.checks import logits

    return logits.run(args)


def report(args) -> int:
    from aquila_npu.checks.report import CHECKS, device_count, format_report, run_report
    from aquila_npu.device.setup import resolve

    checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = [c for c in checks if c not in CHECKS]
    if unknown or not checks:
        raise UsageError(f"--checks {args.checks}: choose from {', '.join(CHECKS)}")
    if "RANK" in os.environ:
        raise UsageError("--report starts its own processes: run it with python -m, not under torchrun")
    if "training" in checks:
        from aquila_npu.checks import training

        training.load_reference()  # a stale reference: refused in one line, before any check runs
    device = resolve(args.device)
    nproc = args.nproc or device_count(device)
    if nproc < 1:
        raise UsageError(f"--nproc {nproc} must be >= 1")
    dtype = args.dtype or ("fp32" if device == "cpu" else "bf16")
    result = run_report(device, nproc=nproc, dtype=dtype, checks=checks, workdir=args.workdir, timeout=args.timeout,
                        comm_size_mb=args.comm_size_mb)
    print(format_report(result))
    if args.out:
        write_json(args.out, result, "the selfcheck report", indent=1)
        print(f"wrote {args.out}")
    if not result["passed"]:
        raise CheckFailed(f"{len(result['failed'])} check(s) failed: {', '.join(result['failed'])}"
                          + (f"; logs in {result['logs']}" if result["logs"] else ""))
    return 0
