"""Names users give for dtypes (--params-dtype, --dtype, checkpoint metadata) and back."""

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
SHORT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def parse_dtype(name: str) -> torch.dtype:
    """``bf16`` / ``bfloat16`` / ``torch.bfloat16`` -> torch.bfloat16."""
    try:
        return DTYPES[str(name).replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> ``bfloat16`` (the name torch and Hugging Face configs use)."""
    return str(dtype).replace("torch.", "")


def short_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> ``bf16`` (the flag spelling)."""
    return SHORT_NAMES.get(dtype, dtype_name(dtype))
