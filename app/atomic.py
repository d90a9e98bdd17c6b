"""Atomic file writes: a temporary file in the target's folder, fsync, then rename over the target.

A reader (or a re-run after a kill) sees the old file or the new one, never half of one.

Every output gets the mode `open()` or `mkdir()` gives a new file or folder under the current umask (0644/0755 under
umask 022), so results in a shared folder, or on a volume read by a container running as another user, are readable
like any other file. `tempfile.mkstemp` would make the temporary file, and so the target, 0600 whatever the umask:
ours is created with mode 0666 and the kernel applies the umask, as for `open()`. Folders that a library fills in its
own way (safetensors' `save_file` also makes its files 0600) are given those modes by `give_new_modes` before they
are published.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
from pathlib import Path

from app.errors import UserError

_TRIES = 100


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only read it by setting it,
    which would race with threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_new_modes(root: str | os.PathLike) -> None:
    """Give `root` and everything in it the mode a new folder (`mkdir`) or file (`open`) gets under the umask."""
    mask = current_umask()
    root = Path(root)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def create_temp_file(folder: str | os.PathLike, prefix: str, suffix: str = ".tmp") -> tuple[int, Path]:
    """(a descriptor open for writing, its path): a new file with a unique name in `folder`, created with the mode
    `open(path, "w")` gives under the current umask."""
    for _ in range(_TRIES):
        candidate = Path(folder) / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            return os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), candidate
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no unused temporary name after {_TRIES} tries", str(folder))


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` to `path` atomically, with the mode a new file gets from `open()`. A path that cannot be written
    (a folder in the way, no permission, a full disk) is a one-line UserError naming it; the temporary file is removed
    and the old file, if any, stays."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = create_temp_file(path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
