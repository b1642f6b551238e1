"""The one Aquila2 model definition: megatron-core's GPTModel with a layer spec from a device backend."""

from __future__ import annotations

from typing import Optional

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from aquila_npu.models.attention import SelfAttention
from aquila_npu.models import variants
from aquila_npu.models.registry import ModelSpec


def layer_spec(backend) -> ModuleSpec:
    """A transformer layer (pre-norm attention + pre-norm SwiGLU MLP) made of the backend's modules."""
    norm = backend.layer_norm(rms_norm=True)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=backend.column_parallel_linear(),
                    core_attention=backend.core_attention(),
                    linear_proj=backend.row_parallel_linear(),
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=backend.column_parallel_linear(),
                                         linear_fc2=backend.row_parallel_linear(),
                                         activation_func=backend.activation_func()),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def block_spec(config: TransformerConfig, backend, pp_rank: Optional[int] = None) -> TransformerBlockSubmodules:
    layer = layer_spec(backend)
    n = get_num_layers_to_build(config, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=backend.layer_norm(rms_norm=True))


def build_model(spec: ModelSpec, config: TransformerConfig, backend, *, padded_vocab: int,
                pre_process: bool = True, post_process: bool = True, pp_rank: Optional[int] = None,
                max_sequence_length: Optional[int] = None, parallel_output: bool = True,
                loss_chunk_size: int = 0) -> GPTModel:
    """One pipeline stage of the model (pre_process: holds the embedding; post_process: final norm + output);
    ``loss_chunk_size`` > 0: the training loss is computed that many tokens at a time (``models.chunked_loss``)."""
    variants.check(spec, loss_chunk_size=loss_chunk_size)
    cls, extra = GPTModel, {}
    if loss_chunk_size:
        from aquila_npu.models.chunked_loss import ChunkedLossGPTModel

        cls, extra = ChunkedLossGPTModel, {"loss_chunk_size": loss_chunk_size}
    return variants.apply(cls(
        config=config,
        transformer_layer_spec=block_spec(config, backend, pp_rank),
        vocab_size=padded_vocab,
        max_sequence_length=max_sequence_length or spec.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(spec.rope_theta),
        seq_len_interpolation_factor=spec.rope_scaling_factor,
        **extra,
    ), spec)
