"""What the commands' flags share below ``aquila_npu.cli``: the one table of flags that ModelLink's and
MindSpeed-LLM's scripts pass and that change nothing here (``INERT_FLAGS``: each command accepts the ones its scripts
use, ``add_inert_arguments``, and its start-up banner names those given and why, ``inert_note``, so that no speed- or
numerics-relevant flag is silently ignored), and the checks of numbers every command makes (``check_positive``).

Importing this module imports nothing but the standard library.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

from aquila_npu.errors import UsageError


@dataclass(frozen=True)
class Inert:
    """A flag ModelLink's or MindSpeed-LLM's scripts pass that changes nothing here, and why. ``choices``: the flag
    takes a value, one of these (accepted and ignored); ``metavar``: it takes any value; ``required``: the scripts'
    tool requires it (ModelLink's converter requires --saver), so we do too."""

    why: str
    choices: Optional[Tuple[str, ...]] = None
    required: bool = False
    metavar: Optional[str] = None


INERT_FLAGS: Dict[str, Inert] = {
    "--attention-softmax-in-fp32": Inert("always on (attention softmax runs in fp32)"),
    "--no-masked-softmax-fusion": Inert("the backend chooses the attention kernel (--use-flash-attn)"),
    "--no-gradient-accumulation-fusion": Inert("gradient-accumulation fusion is never used"),
    "--swiglu": Inert("Aquila2 always has a SwiGLU MLP"),
    "--disable-bias-linear": Inert("Aquila2 has no linear biases"),
    "--exit-on-missing-checkpoint": Inert("inference always needs its --load checkpoint"),
    "--no-load-optim": Inert("inference loads weights only"),
    "--no-load-rng": Inert("inference loads weights only"),
    "--sequence-parallel": Inert("inference runs without sequence parallelism"),
    "--exit-signal-handler": Inert("always on: SIGTERM / SIGINT stop training at the end of the iteration, after "
                                   "saving a checkpoint with --save"),
    "--lora-ckpt-filter": Inert("checkpoints of LoRA runs always hold the adapters only"),
    "--dataset-impl": Inert("megatron-core's indexed format is always mmap", ("mmap",)),
    "--model-type": Inert("GPT is the only model family", ("GPT",)),
    "--saver": Inert("both write megatron-core checkpoints (--save-model-type save_huggingface_llama writes a "
                     "Hugging Face folder)", ("megatron", "mcore"), required=True),
    "--pack": Inert("instruction samples are packed when training loads them (pretrain --reset-attention-mask), "
                    "for any --seq-length and with each epoch's own shuffle"),
    "--neat-pack": Inert("packed samples always keep their own attention and positions (pretrain "
                         "--reset-attention-mask)"),
    "--seq-length": Inert("the sequence length is training's (pretrain --seq-length): samples are packed when "
                          "training loads them", metavar="N"),
}


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


ACCEPTED = "inert_flags"  # the parsed flags' attribute naming the inert flags this command accepts


def add_inert_arguments(parser: argparse.ArgumentParser, flags: Iterable[str]) -> None:
    """Accept ``flags`` (keys of ``INERT_FLAGS``) on ``parser``; the parsed flags remember which (``ACCEPTED``)."""
    flags = tuple(flags)
    parser.set_defaults(**{ACCEPTED: flags})
    g = parser.add_argument_group("accepted for ModelLink command lines; no effect here (the banner lists them)")
    for flag in flags:
        inert = INERT_FLAGS[flag]
        if inert.metavar is not None:
            g.add_argument(flag, default=None, metavar=inert.metavar, required=inert.required, help=inert.why)
        elif inert.choices is None:
            g.add_argument(flag, action="store_true", help=inert.why)
        else:
            g.add_argument(flag, choices=inert.choices, default=None, required=inert.required,
                           help=f"{'/'.join(inert.choices)}: {inert.why}")


def inert_given(args: argparse.Namespace) -> List[str]:
    """The inert flags given on this command line (with their value, for flags that take one)."""
    out = []
    for flag in getattr(args, ACCEPTED, ()):
        value = getattr(args, _dest(flag), None)
        if value is True:
            out.append(flag)
        elif value not in (None, False):
            out.append(f"{flag} {value}")
    return out


def inert_note(args: argparse.Namespace) -> str:
    """``; no effect here: --flag (why), ...`` for a start-up banner, or nothing."""
    given = inert_given(args)
    return "; no effect here: " + ", ".join(f"{f} ({INERT_FLAGS[f.split()[0]].why})" for f in given) if given else ""


def check_positive(args: argparse.Namespace, *dests: str) -> None:
    """Each named flag, when given, must be >= 1."""
    for dest in dests:
        value = getattr(args, dest)
        if value is not None and value < 1:
            raise UsageError(f"--{dest.replace('_', '-')} {value} must be >= 1")
