"""The files a training run reads, checked before torch is imported: ``aquila_npu.jobs.pretrain`` calls this first,
and ``training.run.check`` (the run itself, the pre-flight) again. The flags' own consistency is ``cli.pretrain``'s."""

from __future__ import annotations

from aquila_npu.data.paths import check_data_path
from aquila_npu.data.tokenizer import check_tokenizer_path


def check_paths(args) -> None:
    """--tokenizer-name-or-path there (a folder, or a model name for the local HF cache); every --data-path prefix's files there (one line naming what is missing)."""
    if args.tokenizer_name_or_path:
        check_tokenizer_path(args.tokenizer_name_or_path)
    if args.data_path:
        check_data_path(args.data_path, args.is_instruction_dataset)
