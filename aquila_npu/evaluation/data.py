"""Reading evaluation data: JSON-lines files, one file or every ``*.jsonl`` / ``*.json`` file of a folder (read with
the data pipeline's ``iter_json_objects``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, List

from aquila_npu.errors import DataError
from aquila_npu.data.sources import iter_json_objects

__all__ = ["DataError", "Row", "data_files", "read_jsonl"]


@dataclass(frozen=True)
class Row:
    file: str
    line: int  # 1-based line (JSON lines) or item (JSON array) number in the file
    where: str  # "FILE line N" / "FILE row N", for messages
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
    """Every JSON object of every data file (JSON lines, or a ``.json`` array), with where it stands."""
    for file in data_files(path):
        for where, obj in iter_json_objects(file):
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield Row(file, int(where.rsplit(" ", 1)[1]), where, obj)
