"""The versions of torch, torch_npu, megatron-core and peft that the compat records were read from and the tests run
on, checked when a command starts (after its flags are parsed, before any of them is imported).

The supported range of each is the project's own dependency line: ``pyproject.toml`` in a checkout, else the
installed distribution's metadata (which pip wrote from it). Nothing is restated here. torch_npu is not a dependency
(it comes with CANN and must match torch): its rule is torch_npu's own, a torch_npu release runs with the torch of
the same version number.

Installed versions are read from the files the import system would load (``torch/version.py``,
``megatron/core/package_info.py``, ``peft/__init__.py``), not from pip's metadata: a Megatron-LM checkout on
PYTHONPATH (how MindSpeed-LLM is used) shadows the installed megatron-core, and it is the one that would run.

A version outside its range is one line (``UnsupportedVersion``, exit status 2) naming the installed version, where
it was found, the supported range and how to fix the path. ``AQUILA_ALLOW_UNSUPPORTED_VERSIONS=1`` lets the brave run
anyway, warned once per process.

Importing this module imports neither torch nor megatron-core (``packaging`` and the standard library only).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

from aquila_npu.errors import UnsupportedVersion

OVERRIDE_ENV = "AQUILA_ALLOW_UNSUPPORTED_VERSIONS"
DISTRIBUTION = "aquila_npu"

# distribution -> (the import package, the file in it that states the version)
PACKAGES: Dict[str, Tuple[str, str]] = {
    "torch": ("torch", "version.py"),
    "megatron-core": ("megatron.core", "package_info.py"),
    "peft": ("peft", "__init__.py"),
}
_warned = set()


def _pyproject_dependencies() -> Optional[list]:
    """The ``[project] dependencies`` of the checkout this package runs from, or None (an installed wheel)."""
    path = Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        import tomllib
    except ImportError:  # Python 3.10: read the installed metadata instead
        return None
    try:
        with open(path, "rb") as f:
            project = tomllib.load(f).get("project", {})
    except (OSError, ValueError):
        return None
    return project.get("dependencies") if project.get("name") == DISTRIBUTION else None


@functools.lru_cache(maxsize=None)
def supported() -> Dict[str, str]:
    """{distribution: specifier} of the packages in ``PACKAGES``, from the project's own dependency line."""
    from packaging.requirements import Requirement

    lines = _pyproject_dependencies()
    if lines is None:
        try:
            lines = importlib.metadata.requires(DISTRIBUTION) or []
        except importlib.metadata.PackageNotFoundError:
            lines = []
    out = {}
    for line in lines:
        req = Requirement(line)
        if req.name in PACKAGES and not req.marker:
            out[req.name] = str(req.specifier)
    return out


_PATTERNS = {
    "version.py": re.compile(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", re.M),
    "__init__.py": re.compile(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", re.M),
}


def _megatron_version(text: str) -> Optional[str]:
    parts = {k: re.search(rf"^{k}\s*=\s*['\"]?([^'\"\n]*)['\"]?", text, re.M) for k in
             ("MAJOR", "MINOR", "PATCH", "PRE_RELEASE")}
    if not all(parts[k] for k in ("MAJOR", "MINOR", "PATCH")):
        return None
    pre = parts["PRE_RELEASE"].group(1).strip() if parts["PRE_RELEASE"] else ""
    return ".".join(parts[k].group(1).strip() for k in ("MAJOR", "MINOR", "PATCH")) + pre


def _folders(module: str) -> list:
    """The folders the import system would load ``module`` (a package) from, found without importing anything (for
    ``megatron.core`` importlib would import the ``megatron`` namespace package first): the first entry of sys.path
    that holds it, as the path-based finder searches a namespace package's portions; else what find_spec says."""
    parts = module.split(".")
    if len(parts) > 1 and module.split(".")[0] not in sys.modules:
        for entry in sys.path:
            folder = os.path.join(entry or os.getcwd(), *parts)
            if os.path.isfile(os.path.join(folder, "__init__.py")):
                return [folder]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return []
    return list(spec.submodule_search_locations or []) if spec is not None else []


def installed(distribution: str) -> Tuple[Optional[str], Optional[str]]:
    """(version, folder) of the package the import system would load for ``distribution``; (None, None) when it is
    not importable."""
    module, filename = PACKAGES[distribution]
    folders = _folders(module)
    if not folders:
        return None, None
    for folder in folders:
        path = os.path.join(folder, filename)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError:
            continue
        version = _megatron_version(text) if filename == "package_info.py" else \
            (lambda m: m.group(1) if m else None)(_PATTERNS[filename].search(text))
        if version:
            return version, folder
    try:
        return importlib.metadata.version(distribution), folders[0]
    except importlib.metadata.PackageNotFoundError:
        return None, folders[0]


def _release(version: str) -> str:
    from packaging.version import Version

    return Version(version).base_version


def problem(distribution: str) -> Optional[str]:
    """Why the installed ``distribution`` cannot be used, or None."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    wanted = supported().get(distribution)
    version, folder = installed(distribution)
    if version is None:
        return f"{distribution} is not installed (pip install '{distribution}{wanted or ''}')"
    if not wanted:
        return None
    try:
        ok = SpecifierSet(wanted).contains(Version(version), prereleases=True)
    except InvalidVersion:
        ok = False
    if ok:
        return None
    return (f"{distribution} {version} (from {folder}) is not a supported version: aquila_npu needs "
            f"{distribution}{wanted}; install it (pip install '{distribution}{wanted}') and make sure nothing earlier "
            f"on the path shadows it (a Megatron-LM checkout on PYTHONPATH does)")


def torch_npu_problem(torch_npu_version: str, torch_version: str) -> Optional[str]:
    """torch_npu X.Y.Z[.postN] runs with torch X.Y.Z only."""
    try:
        if _release(torch_npu_version) == _release(torch_version):
            return None
    except Exception:  # an unparseable version string is a mismatch too
        pass
    return (f"torch_npu {torch_npu_version} is built for torch {_release(torch_npu_version)}, but torch "
            f"{torch_version} is installed: install the torch / torch_npu pair of README's 'Versions' table")


def _report(problems) -> None:
    problems = [p for p in problems if p]
    if not problems:
        return
    text = "; ".join(problems)
    if os.environ.get(OVERRIDE_ENV) == "1":
        if text not in _warned:
            _warned.add(text)
            print(f"warning: {text} (running anyway: {OVERRIDE_ENV}=1)", file=sys.stderr, flush=True)
        return
    raise UnsupportedVersion(f"{text}; or set {OVERRIDE_ENV}=1 to try it anyway")


def require(*distributions: str) -> None:
    """Raise ``UnsupportedVersion`` (one line) unless each named distribution is installed in its supported range."""
    _report(problem(d) for d in distributions)


def require_torch_npu(torch_npu_module) -> None:
    """After ``import torch_npu``: its version must pair with the installed torch."""
    import torch

    version = getattr(torch_npu_module, "__version__", None)
    if version is not None:
        _report([torch_npu_problem(str(version), torch.__version__)])
