"""What to install when a package the product uses is missing: one `pip install` hint per package.

The hint is read from this package's own metadata, so it never drifts from pyproject.toml: a default dependency gets
its pinned requirement (`pip install 'matplotlib==3.11.2'`: the environment lost or never had it), a package that
only an extra brings gets the extra (`pip install 'finetune-runner[wandb]'`), anything else its bare name. Heavy and
GPU-only packages (vllm, flash-attn, wandb) are extras and are imported only where used; every such place raises
`missing()` when the import fails, so the user sees one line with the command to run.
"""

from __future__ import annotations

import re
from importlib import metadata

from packaging.requirements import InvalidRequirement, Requirement

from app.errors import UserError

DIST = "finetune-runner"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _extra_of(req: Requirement, extras: list[str]) -> str | None:
    if req.marker is None:
        return None
    return next((e for e in extras if req.marker.evaluate({"extra": e})), None)


def install_hint(package: str) -> str:
    """The `pip install ...` that brings `package` (a distribution name, e.g. "flash-attn")."""
    try:
        requires = metadata.requires(DIST) or []
        extras = metadata.metadata(DIST).get_all("Provides-Extra") or []
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return f"pip install -e . (or pip install {package})"
    for line in requires:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if _canonical(req.name) != _canonical(package):
            continue
        extra = _extra_of(req, extras)
        if extra is None:
            return f"pip install '{req.name}{req.specifier}'"
        if extra not in ("dev", "bench"):
            return f"pip install '{DIST}[{extra}]'"
        return f"pip install -e '.[{extra}]'"
    return f"pip install {package}"


def missing(package: str, needed_for: str, alternative: str = "") -> UserError:
    """The one-line error for a missing `package`: `{needed_for} needs {package}, which is not installed: pip ...`,
    then `, or {alternative}` where there is another way."""
    tail = f", or {alternative}" if alternative else ""
    return UserError(f"{needed_for} needs {package}, which is not installed: {install_hint(package)}{tail}")
