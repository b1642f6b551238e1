"""Reading evaluation data: JSON-lines files, one file or every ``*.jsonl`` / ``*.json`` file of a folder."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator, List

from aquila_npu.data.errors import DataError

__all__ = ["DataError", "Row", "data_files", "read_jsonl"]


@dataclass(frozen=True)
class Row:
    file: str
    line: int  # 1-based line number in the file
    data: dict


def data_files(path: str) -> List[str]:
    """``path`` itself, or the ``*.jsonl`` / ``*.json`` files of the folder ``path`` (sorted)."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.endswith((".jsonl", ".json")) and os.path.isfile(os.path.join(path, f)))
        if not files:
            raise DataError(f"--task-data-path {path}: no .jsonl or .json files in the folder")
        return files
    raise DataError(f"--task-data-path {path}: no such file or folder")


def read_jsonl(path: str) -> Iterator[Row]:
    """Every non-blank line of every data file as a JSON object."""
    for file in data_files(path):
        try:
            with open(file, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{file} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
                    if not isinstance(obj, dict):
                        raise DataError(f"{file} line {n}: expected a JSON object, got {type(obj).__name__}")
                    yield Row(file, n, obj)
        except UnicodeDecodeError as e:
            raise DataError(f"{file}: not UTF-8 text ({e.reason})") from None
