"""QLoRA: LoRA adapters on a frozen 4-bit NF4 base (MindSpeed-LLM's ``--qlora``; Aquila2's ``finetune_qlora.sh``).

The base comes from ``convert_ckpt.py --qlora-nf4`` (``aquila_npu.weights.nf4``: each Hugging Face linear quantised
once by bitsandbytes, NF4, double quantisation, blocksize 64; each rank's file holds its shard). In the model every
decoder linear (qkv, proj, fc1, fc2, with or without an adapter) is megatron-core's own tensor-parallel linear with
``NF4Linear`` mixed in (through the device backend's layer spec, ``NF4Backend``): right after megatron-core built it
its full-precision weight is dropped, so a rank holds one linear's full weight at most while the model is built.
The codes and per-block absmax are buffers (``weight``, ``weight_absmax``, ``weight_columns``: the checkpoint's keys),
and each product dequantises the shard with bitsandbytes into the compute dtype (``_NF4Product``: forward ``x W^T``,
backward ``g W``, the weight dequantised again rather than kept, as bitsandbytes' ``MatMul4Bit`` does). The
tensor-parallel communication is megatron-core's own (its public region functions, applied as its frozen-weight
linear applies them). Embedding, norms and the output layer stay in the run's dtype, as transformers' bitsandbytes
integration leaves them. Adapters, their checkpoints, resume, merge and PEFT export / import are LoRA's.
"""

from __future__ import annotations

import functools
from typing import Tuple

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                           copy_to_tensor_model_parallel_region,
                                           gather_from_sequence_parallel_region)

from aquila_npu.compat.megatron_core import LinearProductSeam
from aquila_npu.errors import CheckpointError, UsageError
from aquila_npu.lora.training import LoraTransform
from aquila_npu.models.dtypes import parse_dtype
from aquila_npu.parallel import agreed
from aquila_npu.weights import nf4


class _NF4Product(torch.autograd.Function):
    """``x W^T`` with W dequantised from the layer's NF4 shard for the product, and again for the input gradient
    (no weight gradient: the base is frozen)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return torch.matmul(x, layer.dequantised(x.dtype).t())

    @staticmethod
    def backward(ctx, grad):
        return torch.matmul(grad, ctx.layer.dequantised(grad.dtype)), None


class NF4Linear(LinearProductSeam):
    """Mixin for megatron-core's ``ColumnParallelLinear`` / ``RowParallelLinear`` (listed before it): the weight is
    this rank's NF4 shard, dequantised for each product. ``nf4_dtype``: the dtype the base was quantised from."""

    nf4_dtype: torch.dtype = torch.bfloat16

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.become_nf4()

    def become_nf4(self) -> None:
        """Replace the full-precision weight megatron-core built by empty NF4 buffers of this rank's shard."""
        rows = self.weight.shape[0]
        device = self.weight.device
        row_parallel = isinstance(self, RowParallelLinear)
        tp = parallel_state.get_tensor_model_parallel_world_size() if row_parallel else 1
        rank = parallel_state.get_tensor_model_parallel_rank() if row_parallel else 0
        width, lo, hi = nf4.shard_geometry("row" if row_parallel else "column", self.input_size, tp, rank)
        del self.weight
        self.register_buffer("weight", torch.zeros(rows, width // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight" + nf4.ABSMAX, torch.zeros(rows, width // nf4.BLOCKSIZE, dtype=torch.float32,
                                                                 device=device))
        self.register_buffer("weight" + nf4.COLUMNS, torch.tensor([lo, hi], dtype=torch.int64, device=device))
        self.nf4_columns: Tuple[int, int] = (lo, hi)

    def nf4_parameters(self) -> int:
        """The parameters of the weight this shard stands for."""
        return self.weight.shape[0] * (self.nf4_columns[1] - self.nf4_columns[0])

    def dequantised(self, dtype: torch.dtype) -> torch.Tensor:
        w = nf4.dequantise(self.weight, getattr(self, "weight" + nf4.ABSMAX), self.nf4_columns, self.nf4_dtype)
        return w if w.dtype == dtype else w.to(dtype)

    def linear_product(self, original, input, weight, *args, bias=None, allreduce_dgrad=False,
                       sequence_parallel=False, tp_group=None, **kwargs):
        # what megatron-core's linear_with_frozen_weight does around its product: the sequence-parallel all-gather
        # (reduce-scatter of the gradient), or the all-reduce of the input gradient
        if sequence_parallel:
            input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True, group=tp_group)
        elif allreduce_dgrad:
            input = copy_to_tensor_model_parallel_region(input, group=tp_group)
        output = _NF4Product.apply(input, self)
        return output if bias is None else output + bias


@functools.lru_cache(maxsize=None)
def nf4_class(base: type, dtype: torch.dtype) -> type:
    """``base`` (a megatron-core tensor-parallel linear class) with its weight in NF4."""
    if not issubclass(base, (ColumnParallelLinear, RowParallelLinear)) or issubclass(base, LinearProductSeam):
        raise UsageError(f"--qlora: the device's {base.__name__} has its own matrix product (--use-mc2?); "
                         "QLoRA's 4-bit linears take megatron-core's plain ones")
    return type(f"NF4{base.__name__}", (NF4Linear, base), {"nf4_dtype": dtype, "__module__": __name__})


class NF4Backend:
    """A device backend whose decoder linears are NF4 (``nf4_class``); everything else is the device's."""

    def __init__(self, inner, dtype: torch.dtype):
        self.inner, self.dtype = inner, dtype

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def column_parallel_linear(self) -> type:
        return nf4_class(self.inner.column_parallel_linear(), self.dtype)

    def row_parallel_linear(self) -> type:
        return nf4_class(self.inner.row_parallel_linear(), self.dtype)


def base_dtype(info) -> torch.dtype:
    """The dtype an NF4 checkpoint was quantised from (refusing a base quantised otherwise)."""
    nf4.check_settings(info.nf4, f"--load {info.root}")
    return parse_dtype(info.nf4["dtype"])


def require_nf4_base(info, flag: str = "--load") -> None:
    if info is not None and not info.is_nf4:
        raise CheckpointError(
            f"--qlora: {flag} {info.root} holds {info.params_dtype} weights, not an NF4 base; quantise it once with: "
            f"python tools/checkpoint/convert_ckpt.py --model-type GPT --loader megatron --saver megatron "
            f"--load-dir {info.root} --save-dir {info.root.rstrip('/')}-nf4 --qlora-nf4 "
            f"--target-tensor-parallel-size {info.layout.tp} --target-pipeline-parallel-size {info.layout.pp}")


def nf4_rank_state(info, params_dtype: torch.dtype) -> dict:
    """This rank's state dict of an NF4 base: codes and absmax as stored, the other weights in ``params_dtype``."""
    tp, pp = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
    return nf4.cast_state(agreed(lambda: info.load_rank(tp, pp))["model"], params_dtype)


def load_nf4_base(info, model, params_dtype: torch.dtype) -> None:
    """This rank's NF4 base into a (Q)LoRA model."""
    from aquila_npu.lora.state import BaseWeights

    BaseWeights(model).load_state_dict(nf4_rank_state(info, params_dtype))


class QLoraTransform(LoraTransform):
    """LoRA on an NF4 base (``--qlora``): the model's linears are built NF4 and the base loads as stored."""

    def __init__(self, lora):
        super().__init__(lora)
        self.nf4_dtype = torch.bfloat16

    def check(self, args, checkpoint, layout, data_parallel_size: int) -> None:
        if getattr(args, "use_mc2", False):
            raise UsageError("--qlora --use-mc2: MC2's linears run their own matrix product; QLoRA's 4-bit linears take "
                             "megatron-core's plain ones (drop --use-mc2)")
        super().check(args, checkpoint, layout, data_parallel_size)
        require_nf4_base(checkpoint)
        self.nf4_dtype = base_dtype(checkpoint)

    def backend(self, backend):
        return NF4Backend(backend, self.nf4_dtype)

    def load(self, args, checkpoint, **kw):
        from aquila_npu.lora.training import load

        return load(args, checkpoint, load_base=lambda model, optimizer: (
            load_nf4_base(checkpoint, model, kw["params_dtype"]), optimizer.reload_model_params()), **kw)

    def describe(self, model, optimizer) -> str:
        stage = getattr(model, "module", model)
        nbytes = sum(m.weight.numel() + getattr(m, "weight" + nf4.ABSMAX).numel() * 4
                     for m in stage.modules() if isinstance(m, NF4Linear))
        params = sum(m.nf4_parameters() for m in stage.modules() if isinstance(m, NF4Linear))
        return (f"QLoRA: base linears NF4 (bitsandbytes, double quantisation, blocksize {nf4.BLOCKSIZE}, dequantised "
                f"to the compute dtype per product): {nbytes / max(params, 1):.4g} bytes per parameter on this rank; "
                + super().describe(model, optimizer))
