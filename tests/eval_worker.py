"""Worker for the evaluation tests, run under torchrun: load a converted checkpoint, run a list of (task, data,
options) through ``aquila_npu.evaluation`` and write each run's records and summary (rank 0).

    torchrun --nproc-per-node N tests/eval_worker.py LOAD_DIR TOKENIZER_DIR OUT_DIR RUNS.json BATCH_SIZE
"""

import json
import os
import sys

from aquila_npu.checkpoint.load_model import load_model_for_inference
from aquila_npu.checkpoint.megatron_io import CheckpointInfo
from aquila_npu.data.tokenizer import load_tokenizer
from aquila_npu.device.setup import setup
from aquila_npu.evaluation import report
from aquila_npu.evaluation.run import evaluate, write_records
from aquila_npu.evaluation.runner import ModelRunner
from aquila_npu.evaluation.scoring import Scorer
from aquila_npu.evaluation.tasks import EvalOptions, get_task
from aquila_npu.inference.generation import TextGenerator


def main(load, tokenizer_dir, out, runs_file, batch_size):
    with open(runs_file) as f:
        runs = json.load(f)
    loaded_tasks = [(run, get_task(run["task"], EvalOptions(**run["options"]))) for run in runs]
    docs = [task.load(run["path"]) for run, task in loaded_tasks]
    device = setup("cpu")
    loaded = load_model_for_inference(CheckpointInfo.read(load), device)
    tokenizer = load_tokenizer(tokenizer_dir)
    scorer = Scorer(loaded.model, tokenizer, vocab_size=loaded.vocab_size,
                    max_length=loaded.spec.max_position_embeddings, batch_size=batch_size,
                    device=device.torch_device, pad_id=tokenizer.pad_token_id)
    runner = ModelRunner(scorer, TextGenerator.from_loaded(loaded, device.torch_device), batch_size=batch_size)
    import torch

    for (run, task), task_docs in zip(loaded_tasks, docs):
        records = evaluate(task, task_docs, runner)
        summary = report.summarize(task, records, task.scoring)
        if torch.distributed.get_rank() == 0:
            write_records(os.path.join(out, f"{run['name']}.json"), task, summary, records)
            print(report.format_table(summary, task.metric_names(task.scoring)), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5], int(sys.argv[5]))
