"""Reading config modules and `--name=value` overrides into values that remember where they were set.

A config file is executed as Python; every top-level name that does not start with `_` is a config field.
To start from another config, assign its path (relative to the file) to `base_config`:

    base_config = "default.py"
    lora_r = 32

Command-line overrides `--name=value` are applied last; the value is parsed as a Python literal
(`--lora_r=64`, `--quantization=None`, `--target_modules=['q_proj','v_proj']`) and kept as a string otherwise.
"""

from __future__ import annotations

import ast
import types
from pathlib import Path

from app.errors import UserError

Values = dict[str, tuple[object, str]]  # name -> (value, "file:line" or "command line")


def read_source(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read the config file ({err.strerror or err})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: config file is not valid UTF-8 (byte 0x{raw[err.start]:02x}); "
                        "save it as UTF-8") from None


def _failure_line(err: BaseException, path: Path) -> int | str:
    """The line of `path` where an exception raised inside the executed config came from."""
    tb, line = err.__traceback__, "?"
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == str(path):
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _compile(path: Path, source: str):
    try:
        return compile(source, str(path), "exec")
    except (SyntaxError, ValueError) as err:  # ValueError: a NUL byte in the source
        line = getattr(err, "lineno", None) or (source.count("\n", 0, source.find("\0")) + 1 if "\0" in source else "?")
        raise UserError(f"{path}:{line}: syntax error: {getattr(err, 'msg', None) or err}") from None


def _execute(path: Path, source: str) -> dict:
    code = _compile(path, source)
    namespace: dict = {"__file__": str(path), "__name__": "__config__"}
    try:
        exec(code, namespace)
    except SystemExit as err:  # a config that exits must not end the run with its exit code
        raise UserError(f"{path}:{_failure_line(err, path)}: the config called exit({err.code!r}); a config module "
                        "only assigns settings") from None
    except Exception as err:  # a config is user code: report where it failed, in one line
        message = " ".join(str(err).split())
        raise UserError(f"{path}:{_failure_line(err, path)}: {type(err).__name__}: {message}") from None
    return namespace


def read_config_file(path: Path, seen: tuple[Path, ...] = ()) -> Values:
    """Values of one config file (after its base), each with the place that set it."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise UserError(f"{path}: base_config cycle ({chain})")
    if not path.is_file():
        raise UserError(f"{path}: config file not found" + (" (it is a directory)" if path.is_dir() else ""))
    source = read_source(path)
    namespace = _execute(path, source)
    lines = _assignment_lines(source)
    values: Values = {}
    base = namespace.get("base_config")
    if base is not None:
        if not isinstance(base, str) or not base.strip():
            raise UserError(f"{path}:{lines.get('base_config', '?')}: base_config must be a path string")
        values.update(read_config_file(path.parent / base, (*seen, path)))
    for name, value in namespace.items():
        if name.startswith("_") or name == "base_config":
            continue
        if isinstance(value, (types.ModuleType, types.FunctionType, type)):
            continue  # imports and helpers a config may use
        values[name] = (value, f"{path}:{lines.get(name, '?')}")
    return values


def _assignment_lines(source: str) -> dict[str, int]:
    lines: dict[str, int] = {}  # the source compiled already, so it parses
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for target in targets:
            if isinstance(target, ast.Name):
                lines[target.id] = node.lineno
    return lines


def parse_override(arg: str) -> tuple[str, object]:
    if not arg.startswith("--") or "=" not in arg:
        raise UserError(f"override {arg!r} must look like --name=value")
    name, raw = arg[2:].split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, RecursionError, MemoryError):
        value = raw
    return name.replace("-", "_"), value


def add_overrides(values: Values, overrides, problems: list[str]) -> Values:
    """`values` with each `--name=value` applied (as set on the command line); malformed ones go to `problems`."""
    values = dict(values)
    for arg in overrides:
        try:
            name, value = parse_override(arg)
        except UserError as err:
            problems.append(str(err))
            continue
        values[name] = (value, "command line")
    return values
