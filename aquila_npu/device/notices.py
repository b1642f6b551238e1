"""megatron-core's import-time notices that Apex / Transformer Engine are absent. They tell a user nothing they can act
on (the start-up banners name the implementations actually used: ``TorchBackend.describe``, and the optimizer class
for training), so the commands hide exactly these texts, from megatron-core's modules only; every other warning,
including a changed wording of these, still shows.

Importing this module imports neither torch nor megatron-core.
"""

from __future__ import annotations

import re
import warnings

# megatron-core 0.16.1: distributed/fsdp/.../mixed_precision.py and optimizer/optimizer.py (first), optimizer/__init__.py,
# optimizer/clip_grads.py, models/backends.py.
MEGATRON_FALLBACK_NOTICES = (
    "Transformer Engine and Apex are not installed. Falling back to local implementations of multi_tensor_applier "
    "and multi_tensor_scale",
    "Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
    "Transformer Engine and Apex are not installed. Falling back to local implementations of multi_tensor_applier, "
    "multi_tensor_l2norm, and multi_tensor_scale",
    "Apex is not installed. Falling back to Torch Norm",
)


def hide_megatron_fallback_notices() -> None:
    """Ignore exactly these UserWarnings when megatron-core's modules raise them (idempotent: ``filterwarnings``
    replaces an equal filter). Must run before megatron-core is first imported: they are raised at import time."""
    for text in MEGATRON_FALLBACK_NOTICES:
        warnings.filterwarnings("ignore", message=re.escape(text) + r"\Z", category=UserWarning,
                                module=r"megatron\.core(\.|\Z)")
