"""Stand-in for ``aquila_npu.pretrain`` with MindSpeed-LLM's LoRA flags, until the training CLI is wired
(/work/notes/wiring-17.md): ``aquila_npu.training.run.run`` unchanged except for the three calls the wiring adds,
patched in here (build: ``apply_lora``; load / save: ``aquila_npu.lora.training``). Without --lora-target-modules /
--lora-load it is plain ``aquila_npu.pretrain`` (full training), with the same report. For tests and benchmarks.

    torchrun ... -m aquila_npu.testing.lora_pretrain <pretrain flags> [--lora-target-modules ...] [--report FILE]

``--report``: a JSON file (written by rank 0) with the start-up line, parameter counts, the optimizer's parameters
and state bytes (before the first step, and measured at each save), the parameters' dtypes, and whether every save
found the base weights still equal to the --load checkpoint's (LoRA).
"""

import json
import sys
from types import SimpleNamespace
from unittest import mock

import torch
from megatron.core import parallel_state as ps

from aquila_npu.checkpoint import megatron_io
from aquila_npu.lora import settings as lora_settings
from aquila_npu.lora import training as lora_training
from aquila_npu.lora.layers import apply_lora
from aquila_npu.lora.state import is_adapter_key, optimizer_state_bytes, parameter_counts
from aquila_npu.training import arguments, checkpointing, run
from aquila_npu.weights.mapping import Layout, lora_checkpoint_key


def _base_unchanged(args, model, layout) -> bool:
    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    it, _, _ = megatron_io.read_layout(args.load)
    base = megatron_io.load_rank(args.load, it, tp, pp, layout.pp)["model"]
    return all(torch.equal(v, base[lora_checkpoint_key(k)].to(v.dtype)) for k, v in model.module.state_dict().items()
               if not is_adapter_key(k) and not k.endswith("_extra_state"))


def main(argv):
    report_path = None
    if "--report" in argv:
        i = argv.index("--report")
        report_path, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    p = arguments.parser()
    lora_settings.add_arguments(p)
    args = p.parse_args(argv)
    arguments.validate(args)
    lora = lora_training.settings(args)
    report = {"saves": []}
    build_model = run.build_model

    def build_lora_model(spec, cfg, backend, **kw):
        stage = build_model(spec, cfg, backend, **kw)
        layout = Layout(spec, cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size)
        return apply_lora(stage, cfg, lora, layout, kw["pp_rank"], args.seed) if lora else stage

    def load(root, *, model, optimizer, scheduler, layout, params_dtype, **kw):
        if lora:
            out = lora_training.load(args, model=model, optimizer=optimizer, scheduler=scheduler, layout=layout,
                                     params_dtype=params_dtype)
            report["start"] = lora_training.describe(model, optimizer, lora)
        else:
            out = checkpointing.load(root, model=model, optimizer=optimizer, scheduler=scheduler, layout=layout,
                                     params_dtype=params_dtype, **kw)
        report["counts"] = parameter_counts(model)
        report["optimizer_bytes_at_start"] = optimizer_state_bytes(optimizer)
        report["optimizer_params"] = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        report["dtypes"] = sorted({f"{'adapter' if is_adapter_key(k) else 'base'} {p.dtype}".replace("torch.", "")
                                   for k, p in model.module.named_parameters()})
        if torch.distributed.get_rank() == 0 and lora:
            print(report["start"], flush=True)
        return out

    def save(root, iteration, *, model, optimizer, scheduler, layout, consumed_samples, **kw):
        report["saves"].append({"iteration": iteration, "optimizer_bytes": optimizer_state_bytes(optimizer),
                                "base_unchanged": _base_unchanged(args, model, layout) if lora else None})
        if lora:
            lora_training.save(args, lora, iteration, model=model, optimizer=optimizer, scheduler=scheduler,
                               layout=layout, consumed_samples=consumed_samples)
        else:
            checkpointing.save(root, iteration, model=model, optimizer=optimizer, scheduler=scheduler, layout=layout,
                               consumed_samples=consumed_samples, **kw)

    patched = SimpleNamespace(peek=checkpointing.peek, load=load, save=save)
    with mock.patch.object(run, "build_model", build_lora_model), mock.patch.object(run, "checkpointing", patched):
        rc = run.run(args)
    if report_path and torch.distributed.get_rank() == 0:
        with open(report_path, "w") as f:
            json.dump(report, f)
    torch.distributed.destroy_process_group()
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
