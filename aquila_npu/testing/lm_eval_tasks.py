"""lm-evaluation-harness task definitions for local files (no hub access), for tests and benchmarks: BoolQ with the
prompt, choices and metric of lm-eval's ``boolq`` task, read from JSON-lines files through a task YAML
(``--include_path``); MMLU and GSM8K rows written in their real layouts (ours) and as lm-eval's stock task YAMLs over
the same rows (``include:``); the small file writers the test fixtures of the other tasks share."""

from __future__ import annotations

import json
import os
from typing import Sequence

BOOLQ_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {files}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{passage}}}}\\nQuestion: {{{{question}}}}?\\nAnswer:"
doc_to_target: "{{{{ 1 if answer else 0 }}}}"
doc_to_choice: ["no", "yes"]
metric_list:
  - metric: acc
"""


def write_boolq_task(folder, name: str, files: Sequence[str]) -> str:
    """Write ``folder/name.yaml``, the BoolQ task ``name`` over ``files``; returns its path."""
    path = os.path.join(folder, f"{name}.yaml")
    write_yaml(path, BOOLQ_YAML.format(name=name, files=json.dumps(list(map(str, files)))))
    return path


# ---------------------------------------------------------------- MMLU and GSM8K over local rows
# The stock task YAMLs are included (``include:``), so their prompts, few-shot settings, filters and metrics are
# lm-eval's own; only the data source (and for generation the until list and ``max_gen_toks``) is overridden.

def lm_eval_tasks_dir() -> str:
    """lm-eval's own task folder (its stock YAMLs)."""
    import importlib.util

    return os.path.join(os.path.dirname(importlib.util.find_spec("lm_eval").origin), "tasks")


def write_jsonl(path, rows) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_csv(path, header, rows) -> None:
    import csv

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)


def write_yaml(path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_group(path, name: str, tasks: Sequence[str], metrics: Sequence[str]) -> None:
    """An lm-eval group over ``tasks`` with size-weighted mean ``metrics``."""
    aggregate = "".join(f"  - metric: {m}\n    aggregation: mean\n    weight_by_size: true\n" for m in metrics)
    write_yaml(path, f"group: {name}\ntask:\n" + "".join(f"  - {t}\n" for t in tasks) +
               f"aggregate_metric_list:\n{aggregate}metadata:\n  version: 1\n")


def write_mmlu(root, mmlu) -> str:
    """``mmlu``: {subject: {"dev"|"test": [(question, A, B, C, D, answer letter)]}} as ModelLink's headerless
    per-subject CSVs under ``root/mmlu``; returns the test folder (our ``--task-data-path``)."""
    for subject, splits in mmlu.items():
        for split, rows in splits.items():
            write_csv(os.path.join(root, "mmlu", split, f"{subject}_{split}.csv"), None, rows)
    return os.path.join(root, "mmlu", "test")


def write_lm_eval_mmlu(include, data_dir, mmlu, num_fewshot: int = 5, name: str = "local_mmlu") -> list:
    """lm-eval's stock ``mmlu_<subject>`` tasks over the same rows (cais/mmlu's fields, written as JSON lines under
    ``data_dir``) and a group ``name`` over them; returns [group, *tasks]."""
    os.makedirs(include, exist_ok=True)
    stock = lm_eval_tasks_dir()
    tasks = []
    for subject, splits in mmlu.items():
        files = {}
        for split, rows in splits.items():
            files[split] = os.path.join(data_dir, "mmlu", f"{subject}_{split}.jsonl")
            write_jsonl(files[split], [{"question": q, "subject": subject, "choices": [a, b, c, d],
                                        "answer": "ABCD".index(ans)} for q, a, b, c, d, ans in rows])
        task = f"{name}_{subject}"
        write_yaml(os.path.join(include, f"{task}.yaml"),
                   f"include: {stock}/mmlu/default/mmlu_{subject}.yaml\ntask: {task}\ntag: []\n"
                   f"dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n"
                   f"    test: {files['test']}\n    dev: {files['dev']}\nnum_fewshot: {num_fewshot}\n")
        tasks.append(task)
    write_group(os.path.join(include, f"{name}.yaml"), name, tasks, ["acc"])
    return [name, *tasks]


def write_gsm8k(root, train, test) -> str:
    """(question, answer) rows as GSM8K's ``train.jsonl`` / ``test.jsonl`` under ``root/gsm8k``; returns that folder
    (our ``--task-data-path``)."""
    folder = os.path.join(root, "gsm8k")
    write_jsonl(os.path.join(folder, "train.jsonl"), [{"question": q, "answer": a} for q, a in train])
    write_jsonl(os.path.join(folder, "test.jsonl"), [{"question": q, "answer": a} for q, a in test])
    return folder


def write_lm_eval_gsm8k(include, folder, max_gen_toks: int, name: str = "local_gsm8k") -> str:
    """lm-eval's stock ``gsm8k`` (5-shot from train, greedy) over ``folder``'s files, at most ``max_gen_toks``
    tokens; returns the task name."""
    os.makedirs(include, exist_ok=True)
    write_yaml(os.path.join(include, f"{name}.yaml"),
               f"include: {lm_eval_tasks_dir()}/gsm8k/gsm8k.yaml\ntask: {name}\ntag: []\ndataset_path: json\n"
               f"dataset_name: null\ndataset_kwargs:\n  data_files:\n    train: {folder}/train.jsonl\n"
               f"    test: {folder}/test.jsonl\ngeneration_kwargs:\n  until:\n    - \"Question:\"\n    - \"</s>\"\n"
               f"    - \"<|im_end|>\"\n  do_sample: false\n  temperature: 0.0\n  max_gen_toks: {max_gen_toks}\n")
    return name
