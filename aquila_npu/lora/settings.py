"""LoRA settings: MindSpeed-LLM's flags, and what an adapter checkpoint records of them.

    --lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2   (LoRA is on when given, or with --lora-load)
    --lora-r 16 --lora-alpha 32 --lora-dropout 0.0 --lora-load DIR

Every adapted linear is scaled by ``alpha / r``. A linear may have a larger rank than ``r`` (``ranks``): a Hugging Face
adapter whose q/k/v (or gate/up) modules have different A matrices becomes one block-structured adapter of the fused
megatron-core linear (see ``aquila_npu.lora.convert``), of rank ``k * r`` and alpha ``k * alpha``, so its scaling is
still ``alpha / r``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

from aquila_npu.compat import versions
from aquila_npu.errors import UsageError
from aquila_npu.weights.table import LORA_TARGETS

DEFAULT_R = 16  # MindSpeed-LLM's defaults
DEFAULT_ALPHA = 32.0


@dataclass(frozen=True)
class LoraSettings:
    targets: Tuple[str, ...]  # megatron-core linears (LORA_TARGETS order)
    r: int = DEFAULT_R
    alpha: float = DEFAULT_ALPHA
    dropout: float = 0.0
    ranks: Tuple[Tuple[str, int], ...] = field(default=())  # (target, rank) where the rank is not r

    def __post_init__(self):
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets:
            raise UsageError(f"--lora-target-modules {' '.join(self.targets) or '(none)'}: choose one or more of "
                             f"{' '.join(LORA_TARGETS)}")
        if self.r < 1:
            raise UsageError(f"--lora-r {self.r}: must be >= 1")
        if self.alpha <= 0:
            raise UsageError(f"--lora-alpha {self.alpha}: must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"--lora-dropout {self.dropout}: must be in [0, 1)")
        object.__setattr__(self, "targets", tuple(t for t in LORA_TARGETS if t in self.targets))
        object.__setattr__(self, "ranks", tuple((t, n) for t, n in sorted(self.ranks) if n != self.r))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def rank(self, target: str) -> int:
        return dict(self.ranks).get(target, self.r)

    def alpha_of(self, target: str) -> float:
        """The alpha that gives ``target`` (rank ``rank(target)``) the common scaling ``alpha / r``."""
        return self.alpha * self.rank(target) / self.r

    def to_dict(self) -> dict:
        return {"lora_target_modules": list(self.targets), "lora_r": self.r, "lora_alpha": self.alpha,
                "lora_dropout": self.dropout, "lora_ranks": dict(self.ranks)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "LoraSettings":
        return cls(tuple(d["lora_target_modules"]), int(d["lora_r"]), float(d["lora_alpha"]),
                   float(d.get("lora_dropout") or 0.0), tuple((d.get("lora_ranks") or {}).items()))


TRAINING = ("LoRA (on with --lora-target-modules or --lora-load; the --load base is frozen)",
            "an adapter checkpoint (saved by a LoRA run, or converted from a Hugging Face PEFT adapter) to resume (or, "
            "with --finetune, to continue from at iteration 0)")
CONVERSION = ("LoRA (the adapter a conversion merges or exports)",
              "an adapter checkpoint (saved by a LoRA run) to merge into the --load-dir base (W + alpha/r * B A per "
              "tensor-parallel shard) or, with --save-lora-to-hf, to export; the other --lora-* flags, when given, "
              "must be the adapter's")


def add_arguments(parser: argparse.ArgumentParser, texts=TRAINING) -> None:
    """MindSpeed-LLM's LoRA flags (``mindspeed_llm/features_manager/finetune/lora.py``). r / alpha default to None
    so that values given can be told from defaults and checked against a --lora-load adapter. ``texts``: the group's
    title and --lora-load's help for the command (``TRAINING`` or ``CONVERSION``)."""
    title, load_help = texts
    g = parser.add_argument_group(title)
    g.add_argument("--lora-target-modules", nargs="+", default=[], choices=list(LORA_TARGETS), metavar="MODULE",
                   help=f"linears that get adapters: any of {' '.join(LORA_TARGETS)}")
    g.add_argument("--lora-r", type=int, default=None, help=f"adapter rank (default {DEFAULT_R})")
    g.add_argument("--lora-alpha", type=float, default=None,
                   help=f"adapter scaling alpha; updates are scaled by alpha / r (default {DEFAULT_ALPHA:g})")
    g.add_argument("--lora-dropout", type=float, default=None, help="dropout on the adapters' input (default 0)")
    g.add_argument("--lora-load", default=None, help=load_help)
    if texts is TRAINING:
        g.add_argument("--qlora", action="store_true",
                       help="QLoRA (MindSpeed-LLM's flag): the adapters train on a 4-bit base, the --load checkpoint "
                            "written by convert_ckpt.py --qlora-nf4 (bitsandbytes' NF4, double quantisation, "
                            "blocksize 64), dequantised to the compute dtype for each product; needs "
                            "--lora-target-modules (or --lora-load) and bitsandbytes (pip install 'aquila_npu[qlora]')")


def resolve(args: argparse.Namespace, saved: Optional[LoraSettings] = None) -> Optional[LoraSettings]:
    """The run's settings from the flags and the --lora-load adapter's own (``saved``); None when LoRA is off.

    Flags that are given must agree with a saved adapter; flags not given take its values (then the defaults). With
    LoRA on, peft must be a supported version (aquila_npu.compat.versions)."""
    settings = _resolve(args, saved)
    if settings is not None:
        versions.require("peft")
    if settings is not None and getattr(args, "qlora", False):
        from aquila_npu.weights.nf4 import require_bitsandbytes

        require_bitsandbytes("--qlora")
    return settings


def _resolve(args: argparse.Namespace, saved: Optional[LoraSettings]) -> Optional[LoraSettings]:
    targets = tuple(args.lora_target_modules or ())
    if not targets and saved is None:
        if getattr(args, "qlora", False):
            raise UsageError("--qlora needs --lora-target-modules (or --lora-load): QLoRA trains adapters on the "
                             "4-bit base, e.g. --lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2")
        for flag in ("lora_r", "lora_alpha", "lora_dropout"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag.replace('_', '-')} needs --lora-target-modules")
        return None
    given: Dict[str, object] = {"lora_target_modules": targets or None, "lora_r": args.lora_r,
                                "lora_alpha": args.lora_alpha}
    if saved is not None:
        have = saved.to_dict()
        bad = [f"--{k.replace('_', '-')} {_show(v)} (the adapter: {_show(have[k])})" for k, v in given.items()
               if v is not None and _norm(v) != _norm(have[k])]
        if bad:
            raise UsageError(f"--lora-load {args.lora_load}: " + "; ".join(bad) + ". Drop the flags (the adapter's "
                             "settings are used) or start a new adapter.")
        dropout = saved.dropout if args.lora_dropout is None else args.lora_dropout
        return LoraSettings(saved.targets, saved.r, saved.alpha, dropout, saved.ranks)
    return LoraSettings(targets, DEFAULT_R if args.lora_r is None else args.lora_r,
                        DEFAULT_ALPHA if args.lora_alpha is None else args.lora_alpha, args.lora_dropout or 0.0)


def _norm(v):
    if isinstance(v, (list, tuple)):
        return tuple(t for t in LORA_TARGETS if t in v)
    return float(v)


def _show(v) -> str:
    return " ".join(v) if isinstance(v, (list, tuple)) else f"{v:g}"
