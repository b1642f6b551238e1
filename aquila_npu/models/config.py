"""ModelSpec -> megatron-core TransformerConfig."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from aquila_npu.models.registry import ModelSpec



def transformer_config(spec: ModelSpec, *, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                       sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32,
                       hidden_dropout: float = 0.0, attention_dropout: float = 0.0, init_method_std: float = 0.02,
                       use_cpu_initialization: bool = True, **overrides) -> TransformerConfig:
    """The megatron-core config of an Aquila2 model: RMSNorm, SwiGLU, RoPE (rotate-half), no biases, GQA, untied."""
    fields = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.intermediate_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_key_value_heads,
        kv_channels=spec.head_dim,
        layernorm_epsilon=spec.rms_norm_eps,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        rotary_interleaved=False,
        hidden_dropout=hidden_dropout,
        attention_dropout=attention_dropout,
        init_method_std=init_method_std,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        sequence_parallel=sequence_parallel and tensor_parallel > 1,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=use_cpu_initialization,
        # Kernel fusions are chosen by the device backend (config_overrides), never by default.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        # No CUDA graphs; [] is what megatron-core turns its own default "full" into, after a deprecation warning.
        cuda_graph_scope=[],
    )
    fields.update(overrides)
    return TransformerConfig(**fields)
