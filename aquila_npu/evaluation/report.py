"""A task's results: metrics overall, per subject and per category, and the console table.

Every metric is the mean of the per-example values over the examples that have it: a subject's mean is lm-eval's
per-subtask value, the overall and category means are lm-eval's group aggregates with ``weight_by_size`` (and
ModelLink's "total", the correct answers over all questions).
"""

from __future__ import annotations

from typing import Dict, List, Sequence


def _means(records: Sequence[dict], names: Sequence[str]) -> Dict[str, float]:
    out = {}
    for name in names:
        values = [r["metrics"][name] for r in records if name in r.get("metrics", {})]
        if values:
            out[name] = sum(values) / len(values)
    return out


def summarize(task, records: Sequence[dict], scoring: str) -> dict:
    """{"task", "scoring", "n", "metrics", "subjects": {name: {"n", metrics}}, "categories": {...}}."""
    names = task.metric_names(scoring)
    by_subject: Dict[str, List[dict]] = {}
    for r in records:
        by_subject.setdefault(r.get("subject", task.name), []).append(r)
    subjects = {s: {"n": len(rs), **_means(rs, names)} for s, rs in sorted(by_subject.items())}
    by_category: Dict[str, List[dict]] = {}
    for s, rs in by_subject.items():
        for c in task.categories(s):
            by_category.setdefault(c, []).extend(rs)
    categories = {c: {"n": len(rs), "subjects": sum(1 for s in by_subject if c in task.categories(s)),
                      **_means(rs, names)} for c, rs in sorted(by_category.items())}
    return {"task": task.name, "scoring": scoring, "n": len(records), "metrics": _means(records, names),
            "correct": sum(bool(r["correct"]) for r in records), "subjects": subjects, "categories": categories}


def format_table(summary: dict, metric_names: Sequence[str]) -> str:
    """The console table: one line per subject (when there are several), per category, and the total."""
    names = [m for m in metric_names if m in summary["metrics"]]
    width = max([len("total")] + [len(s) for s in summary["subjects"]] + [len(c) for c in summary["categories"]])
    head = f"{'':{width}}  {'n':>6}" + "".join(f"  {m:>{max(len(m), 7)}}" for m in names)

    def line(label, row):
        return f"{label:{width}}  {row['n']:>6}" + "".join(
            f"  {row[m]:>{max(len(m), 7)}.4f}" if m in row else f"  {'-':>{max(len(m), 7)}}" for m in names)

    out = [f"{summary['task']} (scoring {summary['scoring']}): {summary['n']} examples", head]
    if len(summary["subjects"]) > 1:
        out += [line(s, row) for s, row in summary["subjects"].items()]
        out.append("-" * len(head))
    if summary["categories"]:
        out += [line(c, row) for c, row in summary["categories"].items()]
        out.append("-" * len(head))
    out.append(line("total", {"n": summary["n"], **summary["metrics"]}))
    return "\n".join(out)
