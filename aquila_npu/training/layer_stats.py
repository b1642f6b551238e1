"""Per-layer statistics of the first iterations of a run (``pretrain --layer-stats FILE``), written so that two runs
of the same checkpoint and data on different devices or layouts can be compared layer by layer
(``python -m aquila_npu.selfcheck --compare A B``: the first iteration and layer where they part).

Per training iteration, over the whole global batch (every micro-batch and data-parallel rank), whatever the layout:
the L2 norm of the embedding's output, of every transformer layer's input and output (layers numbered 1..L as the
model's, whatever the pipeline stage), of the final norm's output and of the logits; and after the backward, with the
gradients reduced and before the optimizer clips them, the L2 norm of every parameter's gradient (names with the
global layer index; divided by the fp16 loss scale). Sums of squares are added up in fp64 over micro-batches,
sequence shards (sequence parallelism), vocabulary shards and data-parallel ranks; a replica (a tensor every
tensor-parallel rank holds whole, or a gradient every data-parallel rank holds after the all-reduce) is counted once.
With the distributed optimizer each data-parallel rank holds only its shard of the reduced gradients: the gradient
norms are left out (the activations are still compared).

The file: one JSON line describing the run (``meta``), then one per iteration (``iteration``, ``loss``, ``norms``).
The data order of megatron-core's sampler depends on the seed and the global batch, not on the layout, so the same
flags on another device or layout see the same samples.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from typing import Dict, Optional

import torch

from aquila_npu.training.config import RunConfig


class LayerStats:
    def __init__(self, model, cfg: RunConfig, path: str, iterations: int, *, recompute_full: bool,
                 recompute_method: Optional[str], recompute_num_layers: Optional[int], meta: dict):
        from megatron.core import parallel_state as ps

        self.model, self.cfg, self.path, self.iterations = model, cfg, path, iterations
        self.tp_rank, self.dp_rank = ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.sp = cfg.sequence_parallel
        self.offset = self.pp_rank * cfg.layout.layers_per_stage
        self.sums: Dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64))
        self.active, self.optimizer = False, None
        self.grads = not meta.get("distributed_optimizer")
        module = model.module
        self._handles = []
        local_checkpointed = set()
        if recompute_full:
            n = cfg.layout.layers_per_stage
            k = recompute_num_layers or n
            local_checkpointed = set(range(n)) if recompute_method == "uniform" else set(range(min(k, n)))
        if getattr(module, "embedding", None) is not None:
            self._hook(module.embedding, "embedding", inputs=False, sharded=self.sp, checkpointed=False)
        for j, layer in enumerate(module.decoder.layers):
            self._hook(layer, f"layer{layer.layer_number}", inputs=True, sharded=self.sp,
                       checkpointed=j in local_checkpointed)
        if getattr(module.decoder, "final_layernorm", None) is not None and module.post_process:
            self._hook(module.decoder.final_layernorm, "final_norm", inputs=False, sharded=self.sp,
                       checkpointed=False)
        if getattr(module, "output_layer", None) is not None and module.post_process:
            self._hook(module.output_layer, "logits", inputs=False, sharded=True, checkpointed=False)
        self.meta = meta
        if self._writer():
            with open(path, "w") as f:
                f.write(json.dumps({"meta": meta}) + "\n")
        self._wrap_finalize()

    # ------------------------------------------------------------------------------------------------- recording
    def _writer(self) -> bool:
        return torch.distributed.get_rank() == 0

    def _add(self, key: str, t: torch.Tensor, sharded: bool) -> None:
        if not self.active or (not sharded and self.tp_rank != 0):
            return
        self.sums[key] = self.sums[key] + t.detach().double().pow(2).sum().cpu()

    def _hook(self, module, name: str, *, inputs: bool, sharded: bool, checkpointed: bool) -> None:
        # A layer recomputed in the backward (full recomputation) runs its forward twice: once without autograd (the
        # real forward) and once with it (the recomputation, same values); only the first is counted.
        def counted() -> bool:
            return not torch.is_grad_enabled() if checkpointed else torch.is_grad_enabled()

        def pre(mod, args, kwargs):
            if counted():
                x = kwargs.get("hidden_states", args[0] if args else None)
                if isinstance(x, torch.Tensor):
                    self._add(f"{name}.input", x, sharded)

        def post(mod, args, kwargs, out):
            if counted():
                y = out[0] if isinstance(out, (tuple, list)) else out
                if isinstance(y, torch.Tensor):
                    self._add(f"{name}.output" if name not in ("logits",) else name, y, sharded)

        if inputs:
            self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self._handles.append(module.register_forward_hook(post, with_kwargs=True))

    def _wrap_finalize(self) -> None:
        """Record the gradients where megatron-core's schedule finishes them (reduced, before the optimizer)."""
        config = self.model.config
        finalize = config.finalize_model_grads_func

        def finalize_and_record(*a, **kw):
            out = finalize(*a, **kw)
            if self.active and self.grads:
                self._record_grads()
            return out

        config.finalize_model_grads_func = finalize_and_record

    def _record_grads(self) -> None:
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        if self.dp_rank != 0:
            return
        scale = 1.0
        if self.optimizer is not None and self.cfg.params_dtype == torch.float16:
            scale = float(self.optimizer.get_loss_scale())
        for name, p in self.model.module.named_parameters():
            g = getattr(p, "main_grad", None)
            if g is None or not p.requires_grad or not param_is_not_tensor_parallel_duplicate(p):
                continue
            self.sums[f"grad.{self._global_name(name)}"] = (self.sums[f"grad.{self._global_name(name)}"]
                                                           + (g.detach().double() / scale).pow(2).sum().cpu())

    def _global_name(self, name: str) -> str:
        return re.sub(r"decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + self.offset}.", name)

    # ------------------------------------------------------------------------------------------------- iterations
    def begin(self, iteration: int) -> None:
        """Before training iteration ``iteration`` (1-based) runs."""
        self.active = iteration <= self.iterations
        self.sums.clear()

    def end(self, iteration: int, loss: float) -> None:
        """After it ran: every rank adds its sums (collective), rank 0 writes the line."""
        if not self.active:
            return
        self.active = False
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, {k: float(v) for k, v in self.sums.items()})
        total: Dict[str, float] = defaultdict(float)
        for part in gathered:
            for k, v in part.items():
                total[k] += v
        losses = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(losses, loss)
        loss = next((x for x in losses if x is not None and math.isfinite(x)), float("nan"))
        if self._writer():
            with open(self.path, "a") as f:
                f.write(json.dumps({"iteration": iteration, "loss": loss,
                                    "norms": {k: math.sqrt(v) for k, v in sorted(total.items())}}) + "\n")

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
