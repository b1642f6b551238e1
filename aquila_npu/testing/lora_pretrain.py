"""``aquila_npu.pretrain`` (LoRA or full training) that also writes a report of what the tests and the LoRA benchmark
measure: the start-up line, parameter counts, the optimizer's parameters and state bytes (before the first step and
at each save), the parameters' dtypes, and whether every save found the base weights still equal to the --load
checkpoint's (LoRA). The run itself is the real entry point's, unchanged: the report is read at its load and save calls.

    torchrun ... -m aquila_npu.testing.lora_pretrain <pretrain flags> [--lora-target-modules ...] --report FILE
"""

import json
import resource
import sys
from unittest import mock

import torch
from megatron.core import parallel_state as ps

from aquila_npu.checkpoint import megatron_io
from aquila_npu.cli.pretrain import parse
from aquila_npu.jobs import pretrain as pretrain_job
from aquila_npu.lora import training as lora_training
from aquila_npu.lora.state import is_adapter_key, optimizer_state_bytes, parameter_counts
from aquila_npu.training import checkpointing, run
from aquila_npu.weights.mapping import lora_checkpoint_key


def _base_unchanged(args, model) -> bool:
    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    base = megatron_io.CheckpointInfo.read(args.load).load_rank(tp, pp)["model"]
    return all(torch.equal(v, base[lora_checkpoint_key(k)].to(v.dtype)) for k, v in model.module.state_dict().items()
               if not is_adapter_key(k) and not k.endswith("_extra_state"))


def base_linear_bytes(stage) -> dict:
    """Bytes and parameters of this rank's frozen decoder linears (full precision, or QLoRA's NF4 buffers)."""
    from aquila_npu.lora.qlora import NF4Linear
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    nbytes = params = 0
    for name, m in stage.named_modules():
        if ".lora_" in name or ".decoder." not in f".{name}." or not isinstance(m, (ColumnParallelLinear,
                                                                                    RowParallelLinear)):
            continue
        if isinstance(m, NF4Linear):
            nbytes += sum(b.numel() * b.element_size() for b in m.buffers(recurse=False))
            params += m.nf4_parameters()
        else:
            nbytes += m.weight.numel() * m.weight.element_size()
            params += m.weight.numel()
    return {"bytes": nbytes, "parameters": params}


def main(argv):
    report_path = None
    if "--report" in argv:
        i = argv.index("--report")
        report_path, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    args = parse(argv)
    lora = bool(args.lora_target_modules or args.lora_load)
    report = {"saves": []}

    def loaded(model, optimizer):
        report["counts"] = parameter_counts(model)
        report["base_linears"] = base_linear_bytes(model.module)
        report["optimizer_bytes_at_start"] = optimizer_state_bytes(optimizer)
        report["optimizer_params"] = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        report["dtypes"] = sorted({f"{'adapter' if is_adapter_key(k) else 'base'} {p.dtype}".replace("torch.", "")
                                   for k, p in model.module.named_parameters()})

    def saving(iteration, model, optimizer):
        report["saves"].append({"iteration": iteration, "optimizer_bytes": optimizer_state_bytes(optimizer),
                                "base_unchanged": _base_unchanged(args, model) if lora else None})

    lora_load, lora_save, lora_describe = lora_training.load, lora_training.save, lora_training.describe
    full_load, full_save = checkpointing.load, checkpointing.save

    def describe(model, optimizer, settings):
        report["start"] = lora_describe(model, optimizer, settings)
        return report["start"]

    from aquila_npu.lora.qlora import QLoraTransform  # (QLoRA's line: its base, then LoRA's)

    qlora_describe = QLoraTransform.describe

    def describe_qlora(self, model, optimizer):
        report["start"] = qlora_describe(self, model, optimizer)
        return report["start"]

    def load_lora(*a, model, optimizer, **kw):
        out = lora_load(*a, model=model, optimizer=optimizer, **kw)
        loaded(model, optimizer)
        return out

    def save_lora(a, settings, save_dir, iteration, *, model, optimizer, **kw):
        saving(iteration, model, optimizer)
        return lora_save(a, settings, save_dir, iteration, model=model, optimizer=optimizer, **kw)

    # (LoRA's load and save call these too, with views of the model: recorded by the LoRA wrappers instead)
    def load_full(info, *, model, optimizer, **kw):
        out = full_load(info, model=model, optimizer=optimizer, **kw)
        if not lora:
            loaded(model, optimizer)
        return out

    def save_full(save_dir, iteration, *, model, optimizer, **kw):
        if not lora:
            saving(iteration, model, optimizer)
        return full_save(save_dir, iteration, model=model, optimizer=optimizer, **kw)

    with mock.patch.object(lora_training, "load", load_lora), mock.patch.object(lora_training, "save", save_lora), \
            mock.patch.object(lora_training, "describe", describe), \
            mock.patch.object(QLoraTransform, "describe", describe_qlora), \
            mock.patch.object(run.checkpointing, "load", load_full), \
            mock.patch.object(run.checkpointing, "save", save_full):
        rc = pretrain_job.run(args)  # the command's own library call (LoRA as its model transform)
    report["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # (Linux: KiB)
    if report_path and torch.distributed.get_rank() == 0:
        with open(report_path, "w") as f:
            json.dump(report, f)
    torch.distributed.destroy_process_group()
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
