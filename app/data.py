"""Reading tabular input (CSV or JSONL) with errors that name the file and line.

Every reader returns a list of plain dict rows plus the line number each row came from, so that later
validation (a bad label, say) can still point at the right line.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from app.errors import UserError

csv.field_size_limit(1 << 30)  # a 1 MB field is data to truncate later, not a reason to crash here


@dataclass(frozen=True)
class Row:
    line: int  # 1-based line in the file where the row starts (the header is line 1 for CSV)
    values: dict


def read_text(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # course files start with a UTF-8 BOM
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start})") from None
    if not text.strip():
        raise UserError(f"{path}: file is empty")
    return text


def read_rows(path: str | Path, required: tuple[str, ...] = ()) -> list[Row]:
    """Read a .csv, or a .jsonl/.ndjson/.json file (JSON lines, or one JSON array of objects); check that
    `required` columns exist."""
    path = Path(path)
    text = read_text(path)
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        rows = _read_json_array(path, text) if text.lstrip().startswith("[") else _read_jsonl(path, text)
    else:
        rows = _read_csv(path, text)
    if not rows:
        raise UserError(f"{path}: no data rows")
    missing = [c for c in required if c not in rows[0].values]
    if missing:
        have = ", ".join(rows[0].values) or "none"
        line = 1 if path.suffix.lower() not in (".jsonl", ".ndjson") else rows[0].line  # the CSV header
        raise UserError(f"{path}:{line}: missing column(s) {', '.join(missing)} (columns found: {have})")
    return rows


def _read_csv(path: Path, text: str) -> list[Row]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except (StopIteration, csv.Error) as err:
        raise UserError(f"{path}:1: cannot read the CSV header ({err})") from None
    header = [h.strip() for h in header]
    rows: list[Row] = []
    start = reader.line_num + 1
    try:
        for record in reader:
            if not record or (len(record) == 1 and not record[0].strip()):
                start = reader.line_num + 1
                continue
            if len(record) != len(header):
                raise UserError(
                    f"{path}:{start}: expected {len(header)} fields ({', '.join(header)}), found {len(record)}"
                )
            rows.append(Row(start, dict(zip(header, record))))
            start = reader.line_num + 1
    except csv.Error as err:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None
    return rows


def _read_jsonl(path: Path, text: str) -> list[Row]:
    rows: list[Row] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: broken JSON line ({err.msg} at column {err.colno})") from None
        if not isinstance(value, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, found {type(value).__name__}")
        rows.append(Row(number, value))
    return rows


def _read_json_array(path: Path, text: str) -> list[Row]:
    """Objects of a JSON array, each with the line it starts on (decoded one by one, so errors have lines)."""
    decoder, pos = json.JSONDecoder(), len(text) - len(text.lstrip()) + 1
    rows: list[Row] = []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise UserError(f"{path}:{text.count(chr(10)) + 1}: JSON array not closed")
        if text[pos] == "]":
            return rows
        line = text.count("\n", 0, pos) + 1
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{err.lineno}: broken JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(value, dict):
            raise UserError(f"{path}:{line}: expected a JSON object, found {type(value).__name__}")
        rows.append(Row(line, value))


def parse_binary_label(value, path: Path | str, line: int, column: str = "label") -> int:
    """0/1 label from CSV text or JSON; anything else is an error naming the line."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    if isinstance(value, float) and value in (0.0, 1.0):
        return int(value)
    if isinstance(value, str) and value.strip() in ("0", "1", "0.0", "1.0"):
        return int(float(value.strip()))
    raise UserError(f"{path}:{line}: {column} must be 0 or 1, found {value!r}")
