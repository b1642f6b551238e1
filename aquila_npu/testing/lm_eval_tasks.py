"""lm-evaluation-harness task definitions for local files (no hub access): BoolQ with the prompt, choices and
metric of lm-eval's ``boolq`` task, read from JSON-lines files through a task YAML (``--include_path``)."""

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
    with open(path, "w") as f:
        f.write(BOOLQ_YAML.format(name=name, files=json.dumps(list(map(str, files)))))
    return path
