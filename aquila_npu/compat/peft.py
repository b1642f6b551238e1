"""peft: its megatron-core LoRA layer, fixed, and registered through its custom-module API (``RECORDS``).

peft's megatron-core layer, ``peft.tuners.lora.tp_layer.LoraParallelLinear``, does the tensor parallelism LoRA needs
(on a ColumnParallelLinear A is a whole ``nn.Linear`` on every rank and B a ColumnParallelLinear split by output; on a
RowParallelLinear A is a RowParallelLinear split by input and B a whole ``nn.Linear``; scaling alpha / r). As shipped
in peft 0.21.2 its megatron-core path does not run, so ``MegatronLoraLinear`` subclasses it and is registered through
peft's custom-layer API (``LoraConfig._register_custom_module``) instead of peft's ``dispatch_megatron``:

1. ``dispatch_megatron`` reads ``kwargs["fan_in_fan_out"]``, which ``LoraModel`` no longer passes (KeyError);
2. ``update_layer`` never sets ``lora_bias[adapter]``, which ``reset_lora_parameters`` reads (KeyError; peft PR 2621);
3. ``forward`` passes megatron-core's ``(output, bias)`` tuples on as tensors (TypeError);
4. peft moves adapters to the base layer's dtype (bf16) and its later fp32 upcast (``cast_adapter_dtype``) replaces the
   Parameter objects, dropping megatron-core's tensor-parallel attributes: adapters are moved to the device only.

Sequence parallelism: the whole (replicated) adapter matrix carries megatron-core's ``sequence_parallel`` parameter
attribute (as its norms do), so ``finalize_model_grads`` all-reduces its partial gradients over the tensor-parallel
group (aquila_npu.lora.layers explains the data flow).
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from peft import LoraConfig
from peft.tuners.lora.tp_layer import LoraParallelLinear

from aquila_npu.compat.record import Replacement

PEFT = "peft 0.21.2"
TP_LAYER = "peft.tuners.lora.tp_layer:LoraParallelLinear"

RECORDS = (
    Replacement("peft.tuners.lora.config:LoraConfig._register_custom_module", "called",
                "peft's way to map a layer class to a LoRA layer (experimental, private): megatron-core's two "
                "linears to MegatronLoraLinear, instead of the broken dispatch_megatron", PEFT,
                "tests/test_lora_model.py", "(self, mapping)"),
    Replacement(f"{TP_LAYER}.__init__", "wrapped", "called with megatron-core as the backend and the model's config",
                PEFT, "tests/test_lora_model.py",
                "(self, base_layer, adapter_name, config, backend, r=0, lora_alpha=1, is_target_conv_1d_layer=False, "
                "**kwargs)"),
    Replacement(f"{TP_LAYER}.update_layer", "wrapped",
                "fix 2 (lora_bias[adapter] set first) and megatron-core's sequence_parallel attribute on the whole "
                "adapter matrix", PEFT, "tests/test_lora_model.py",
                "(self, adapter_name, r, lora_alpha, config, init_method=xavier_normal_, input_is_parallel=True, "
                "gather_output=False, inference_mode=False, **parallel_linear_kwargs)"),
    Replacement(f"{TP_LAYER}._move_adapter_to_device_of_base_layer", "overridden",
                "fix 4: the device only, never the base layer's dtype (keeps the Parameter objects and their "
                "tensor-parallel attributes)", PEFT, "tests/test_lora_model.py", "(self, adapter_name, device=None)"),
    Replacement(f"{TP_LAYER}.forward", "overridden", "fix 3: megatron-core's (output, bias) tuples", PEFT,
                "tests/test_lora_model.py", "(self, x, *args, **kwargs)"),
    Replacement(f"{TP_LAYER}._check_forward_args", "called", "what peft's own forward checks first", PEFT,
                "tests/test_lora_model.py", "(self, x, *args, **kwargs)"),
    Replacement(f"{TP_LAYER}._cast_input_dtype", "called", "the input cast to the adapter's dtype, as peft's forward",
                PEFT, "tests/test_lora_model.py", "(self, x, dtype)"),
)


class MegatronLoraLinear(LoraParallelLinear):
    """peft's LoraParallelLinear with the four fixes of the module docstring."""

    def __init__(self, base_layer, adapter_name, config: LoraConfig, **kwargs):
        super().__init__(base_layer, adapter_name, config, backend=tensor_parallel,
                         megatron_config=config.megatron_config, **kwargs)

    def update_layer(self, adapter_name, *args, **kwargs):
        self.lora_bias[adapter_name] = False  # fix 2
        super().update_layer(adapter_name, *args, **kwargs)
        megatron_config = kwargs["megatron_config"]
        whole = self.lora_B[adapter_name] if self.is_parallel_a else self.lora_A[adapter_name]
        setattr(whole.weight, "sequence_parallel", bool(megatron_config.sequence_parallel))

    def _move_adapter_to_device_of_base_layer(self, adapter_name, device=None):  # fix 4
        device = device or self.get_base_layer().weight.device
        for layers in (self.lora_A, self.lora_B):
            if adapter_name in layers:
                layers[adapter_name].to(device)

    def forward(self, x: torch.Tensor, *args, **kwargs):  # fix 3
        self._check_forward_args(x, *args, **kwargs)
        if self.disable_adapters and self.merged:
            self.unmerge()
        result, bias = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result, bias
        dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            a, b = self.lora_A[name], self.lora_B[name]
            h = _output(a(self.lora_dropout[name](self._cast_input_dtype(x, a.weight.dtype))))
            result = result + _output(b(h)) * self.scaling[name]
        return result.to(dtype), bias


def _output(y):
    """A megatron-core linear returns (output, bias); an nn.Linear the output."""
    return y[0] if isinstance(y, tuple) else y


def lora_config(**kwargs) -> LoraConfig:
    """peft's ``LoraConfig(**kwargs)`` whose megatron-core linears become ``MegatronLoraLinear``."""
    config = LoraConfig(**kwargs)
    config._register_custom_module({tensor_parallel.ColumnParallelLinear: MegatronLoraLinear,
                                    tensor_parallel.RowParallelLinear: MegatronLoraLinear})
    return config
