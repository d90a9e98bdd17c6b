"""Atomic file writes: a temporary file in the target's folder, fsync, then rename over the target.

A reader (or a re-run after a kill) sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from app.errors import UserError


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` to `path` atomically. A path that cannot be written (a folder in the way, no permission, a full
    disk) is a one-line UserError naming it; the temporary file is removed and the old file, if any, stays."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise UserError(f"{path}: cannot write ({err.strerror or err})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(err, OSError):
            raise UserError(f"{path}: cannot write ({err.strerror or err})") from None
        raise
    return path


def write_json_atomic(path: str | os.PathLike, value, **dump_kwargs) -> Path:
    return write_atomic(path, json.dumps(value, indent=2, **dump_kwargs) + "\n")
