"""The model flags of the inference commands (generate, evaluate): ModelLink's, so its scripts parse, but only
``--load`` and ``--tokenizer-name-or-path`` are needed: the architecture comes from the checkpoint, and architecture
flags that are given are checked against it.

Importing this module imports neither torch nor megatron-core (``--help`` and input errors come before them)."""

from __future__ import annotations

import argparse

from aquila_npu.cli.common import add_device_argument
from aquila_npu.device.fused import FusedOps
from aquila_npu.flags import add_inert_arguments
from aquila_npu.models import arch_flags

INERT = ("--swiglu", "--disable-bias-linear", "--exit-on-missing-checkpoint", "--no-load-optim", "--no-load-rng",
         "--no-masked-softmax-fusion",
         "--attention-softmax-in-fp32", "--no-gradient-accumulation-fusion", "--sequence-parallel")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--load", required=True, metavar="DIR",
                   help="Megatron checkpoint directory written by tools/checkpoint/convert_ckpt.py (or training); "
                        "the architecture, vocabulary and tp/pp split are read from it")
    g.add_argument("--tokenizer-name-or-path", required=True, metavar="DIR",
                   help="folder with the Hugging Face tokenizer files (the original HF model folder)")
    g.add_argument("--lora-load", default=None, metavar="DIR",
                   help="a LoRA or QLoRA adapter checkpoint (saved by training, or converted from a Hugging Face PEFT "
                        "adapter for the --load layout) applied on the --load base without merging, as MindSpeed-LLM's "
                        "inference does; --load may be the full-precision base or the NF4 one (--qlora-nf4)")
    g.add_argument("--tokenizer-type", default="PretrainedFromHF", choices=["PretrainedFromHF"],
                   help="tokenizer kind (only PretrainedFromHF, as in ModelLink's scripts)")
    g.add_argument("--tokenizer-not-use-fast", action="store_true",
                   help="load the slow (Python) tokenizer, as ModelLink's scripts do; ids are the same for Aquila2")
    g.add_argument("--tensor-model-parallel-size", type=int, default=None, metavar="T",
                   help="tensor-parallel size (default: the checkpoint's); must equal the checkpoint's")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=None, metavar="P",
                   help="pipeline-parallel size (default: the checkpoint's); must equal the checkpoint's")
    add_device_argument(g)
    dt = g.add_mutually_exclusive_group()
    dt.add_argument("--fp16", action="store_true", help="compute in float16 (default: the checkpoint's dtype)")
    dt.add_argument("--bf16", action="store_true", help="compute in bfloat16 (default: the checkpoint's dtype)")
    g.add_argument("--micro-batch-size", type=int, default=None, metavar="B",
                   help="prompts (or evaluation sequences) per forward pass")
    g.add_argument("--seq-length", type=int, default=None, metavar="N",
                   help="longest sequence (prompt + generated tokens) to run (default and maximum: the model's "
                        "max_position_embeddings)")
    FusedOps.add_arguments(p)
    arch_flags.add_arguments(p, "architecture (optional; read from the checkpoint, and checked against it when given)")
    add_inert_arguments(p, INERT)
