"""What a model family changes in the one model definition (``models.gpt.build_model``), in one place: Baichuan2's
output layer (``norm_head``) and its position scheme. ``check`` runs before anything is built (one-line errors),
``apply`` on each built stage."""

from __future__ import annotations

from aquila_npu.errors import UsageError
from aquila_npu.models.registry import ModelSpec

POSITIONS = ("rope", "alibi")
OUTPUT_LAYERS = ("linear", "normhead")


def check(spec: ModelSpec, *, loss_chunk_size: int = 0) -> None:
    """Refuse, in one line, what the model definition cannot build for ``spec``."""
    if spec.position_embedding not in POSITIONS:
        raise UsageError(f"{spec.name}: position embedding {spec.position_embedding!r} is not one of "
                         f"{', '.join(POSITIONS)}")
    if spec.position_embedding == "alibi":
        raise UsageError(f"{spec.name}: ALiBi position biases (Baichuan2-13B) are not implemented yet (issue 25); "
                         "RoPE models (Baichuan2-7B, Aquila2) run")
    if spec.output_layer not in OUTPUT_LAYERS:
        raise UsageError(f"{spec.name}: output layer {spec.output_layer!r} is not one of {', '.join(OUTPUT_LAYERS)}")
    if spec.output_layer == "normhead" and loss_chunk_size:
        raise UsageError(f"--loss-chunk-size {loss_chunk_size}: the chunked loss reads the output weight directly "
                         f"and {spec.name}'s NormHead normalises it; drop --loss-chunk-size")


def apply(model, spec: ModelSpec):
    """A built stage with the family's modules installed (NormHead on the last stage's output layer)."""
    if spec.output_layer == "normhead" and getattr(model, "output_layer", None) is not None:
        from aquila_npu.models import norm_head

        norm_head.install(model.output_layer)
    return model
