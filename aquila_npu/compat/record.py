"""What one replacement of another library's code is, written down where it is made (``RECORDS`` of each compat
module)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Replacement:
    """One place where aquila_npu goes past another library's public API.

    ``target``: ``"module:qualified.name"`` of the object replaced, wrapped, overridden or called.
    ``how``: ``replaced`` (the attribute is set to ours while installed), ``wrapped`` (ours calls the original),
    ``overridden`` (a subclass of ours defines this private method), ``called`` (we call this private name),
    ``bound`` (a module-level name bound at the library's import, rebound by us).
    ``why``: the reason, in one or two sentences. ``read_from``: the release whose source this was written from.
    ``test``: the test that covers the behaviour. ``signature``: ``str(inspect.signature(target))`` as written for;
    None where the target is not a callable with a signature (a global, a C++ op).
    """

    target: str
    how: str
    why: str
    read_from: str
    test: str
    signature: Optional[str] = None

    HOWS = ("replaced", "wrapped", "overridden", "called", "bound")

    def __post_init__(self):
        if self.how not in self.HOWS:
            raise ValueError(f"{self.target}: how={self.how!r}, not one of {self.HOWS}")
        if ":" not in self.target:
            raise ValueError(f"{self.target}: write the target as 'module:qualified.name'")

    @property
    def module(self) -> str:
        return self.target.split(":", 1)[0]

    @property
    def qualname(self) -> str:
        return self.target.split(":", 1)[1]


def signature_of(fn) -> str:
    """``fn``'s parameters as written in ``Replacement.signature``: names, kinds and defaults, no annotations (those
    are spelled differently by Python versions and postponed evaluation)."""
    import inspect

    sig = inspect.signature(fn)
    params = [p.replace(annotation=inspect.Parameter.empty,
                        default=_Named(p.default) if p.default is not p.empty and callable(p.default) else p.default)
              for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


class _Named:
    """A callable default shown by its name (its repr would carry a memory address)."""

    def __init__(self, fn):
        self.name = getattr(fn, "__qualname__", type(fn).__name__)

    def __repr__(self) -> str:
        return self.name
