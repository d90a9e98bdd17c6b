"""Reading tabular input (CSV or JSONL) with errors that name the file and line.

Every reader returns a list of plain dict rows plus the line number each row came from, so that later
validation (a bad label, say) can still point at the right line.

Formats, by suffix: `.jsonl`/`.ndjson`/`.json` are JSON: one object per line (lines end at `\n` only, a
trailing `\r` is dropped: U+2028, U+2029 or U+0085 inside a string are data), one JSON array of
objects, or objects written one after another, each over several lines (pretty-printed records); anything
else is CSV with a header line (names must be unique). Every problem is a `UserError` of one line naming
the file and, where there is one, the line: a missing, unreadable or non-regular file, undecodable bytes,
an empty file, broken JSON, JSON nested too deeply, a non-object record, a duplicated CSV column, a row with
the wrong number of fields.

`read_rows` returns `Rows`: a list that also carries a fingerprint of what it was read from (the file's bytes and
this reader's code), so that the token cache can name the data without hashing every row again.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from app import sources
from app.errors import UserError

csv.field_size_limit(1 << 30)  # a 1 MB field is data to truncate later, not a reason to crash here


@dataclass(frozen=True)
class Row:
    line: int  # 1-based line in the file where the row starts (the header is line 1 for CSV)
    values: dict


@dataclass
class Feature:
    """One tokenized training example (what a task's `encode` makes of a Row)."""

    input_ids: list[int]
    labels: list[int]  # same length; -100 where no loss is taken
    line: int = 0  # source line, for messages
    extra: dict = field(default_factory=dict)  # task-specific tensors-to-be (e.g. regression targets)


class Rows(list):
    """The rows of one source as read, and `fingerprint`: a digest of the source (its bytes, or a Hub revision)
    and of the reader code. A slice or any other new list is a plain list, without one, so
    only the list as read (and checked in place by its task) is named by it."""

    def __init__(self, rows, fingerprint: str | None = None):
        super().__init__(rows)
        self.fingerprint = fingerprint


@functools.cache
def reader_identity() -> str:
    """The code that turns a file into rows (this module and app.sources): a change to it may change the rows."""
    h = hashlib.sha256()
    for module in (__file__, sources.__file__):
        h.update(Path(module).read_bytes())
    return h.hexdigest()


def source_fingerprint(kind: str, digest: str) -> str:
    return hashlib.sha256(f"{kind}\0{digest}\0{reader_identity()}".encode()).hexdigest()


def read_text(path: Path) -> str:
    return decode_text(path, read_bytes(path))


def read_bytes(path: Path) -> bytes:
    """The bytes of a regular file; a missing, non-regular or unreadable one is a one-line error."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a file")
    if not path.is_file():
        raise UserError(f"{path}: not a regular file")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None
    return raw


def decode_text(path: Path, raw: bytes) -> str:
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
    `required` columns exist. Parquet, `save_to_disk` directories and `hf:` Hub ids go to app.sources."""
    if sources.handles(path):
        records, kind, identity = sources.read_records(path, required)
        return Rows([Row(i + 1, values) for i, values in enumerate(records)], source_fingerprint(kind, identity))
    path = Path(path)
    raw = read_bytes(path)
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        text = decode_text(path, raw)
        rows = _read_json_array(path, text) if text.lstrip().startswith("[") else _read_jsonl(path, text)
    else:
        decode_text(path, raw)  # undecodable bytes and an empty file are reported here, naming the line
        rows = _read_csv(path, raw)
    if not rows:
        raise UserError(f"{path}: no data rows")
    missing = [c for c in required if c not in rows[0].values]
    if missing:
        have = ", ".join(rows[0].values) or "none"
        line = 1 if path.suffix.lower() not in (".jsonl", ".ndjson") else rows[0].line  # the CSV header
        raise UserError(f"{path}:{line}: missing column(s) {', '.join(missing)} (columns found: {have})")
    return Rows(rows, source_fingerprint("file", hashlib.sha256(raw).hexdigest()))


def csv_field(value) -> str:
    """One CSV field: quoted when it holds a comma, a quote or any line break (a bare \r too, which the csv module
    leaves unquoted when the line terminator is \n), so that `_read_csv` reads back exactly what was written."""
    text = str(value)
    if any(c in text for c in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def csv_text(header: list[str], rows) -> str:
    """A CSV file's text: the header, then each row (a sequence of values), `\n` line ends."""
    return "".join(",".join(csv_field(v) for v in row) + "\n" for row in [header, *rows])


def _read_csv(path: Path, raw: bytes) -> list[Row]:
    # decoded a block at a time: a StringIO of the whole text would hold it at 4 bytes a character (400 MB for a
    # 100 MB file) on top of the rows; newline="" keeps line ends as they are, as the csv module wants
    reader = csv.reader(io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8-sig", newline=""))
    try:
        header = next(reader)
    except (StopIteration, csv.Error) as err:
        raise UserError(f"{path}:1: cannot read the CSV header ({err})") from None
    header = [h.strip() for h in header]
    seen: set[str] = set()
    for name in header:
        if name and name in seen:
            raise UserError(f"{path}:1: column {name!r} appears more than once in the header")
        seen.add(name)
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


def json_lines(text: str) -> list[str]:
    """Lines of a JSON-lines text: split at `\n` only (U+2028, U+2029 and U+0085, which JSON strings may hold, are
    not line ends, unlike for `str.splitlines`), a trailing `\r` dropped."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def intact_json_lines(data: bytes) -> tuple[list, int]:
    """The values of an append-only JSON-lines log (a partial output, a response cache) up to its first line that is
    torn (no newline: a kill while it was written) or does not parse, and the byte offset after the last intact
    line: where the next append goes, the rest being dropped and redone."""
    values, pos = [], 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        if end < 0:
            break
        try:
            values.append(json.loads(data[pos:end]))
        except (ValueError, RecursionError):
            break
        pos = end + 1
    return values, pos


def _loads(path: Path, number: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{number}: broken JSON line ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise UserError(f"{path}:{number}: JSON nested too deeply") from None
    except ValueError as err:  # e.g. an integer with more digits than Python converts
        raise UserError(f"{path}:{number}: broken JSON line ({err})") from None


def _read_jsonl(path: Path, text: str) -> list[Row]:
    lines = json_lines(text)
    first = next((line for line in lines if line.strip()), "")
    start = len(text) - len(text.lstrip(" \t\r\n"))
    if first.lstrip().startswith("{") and text.startswith("{", start):
        try:
            json.loads(first)
        except (ValueError, RecursionError):
            # no whole object on the first line: pretty-printed objects one after another when the first one decodes
            # across lines; otherwise that line is simply broken (and reported as such below)
            try:
                json.JSONDecoder().raw_decode(text, start)
            except RecursionError:
                return _read_json_values(path, text, start, closing=None)  # reports it, naming the line
            except ValueError:
                pass
            else:
                return _read_json_values(path, text, start, closing=None)
    rows: list[Row] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        value = _loads(path, number, line)
        if not isinstance(value, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, found {type(value).__name__}")
        rows.append(Row(number, value))
    return rows


def _read_json_array(path: Path, text: str) -> list[Row]:
    """Objects of a JSON array, each with the line it starts on (decoded one by one, so errors have lines)."""
    return _read_json_values(path, text, len(text) - len(text.lstrip()) + 1, closing="]")


def _read_json_values(path: Path, text: str, pos: int, closing: str | None) -> list[Row]:
    """JSON objects from `pos` on, separated by white space (and commas inside an array), up to `closing` (`]`) or
    the end of the text (objects one after another), each with the line it starts on."""
    decoder = json.JSONDecoder()
    rows: list[Row] = []
    while True:
        while pos < len(text) and text[pos] in (" \t\r\n," if closing else " \t\r\n"):
            pos += 1
        if pos >= len(text):
            if closing is None:
                return rows
            raise UserError(f"{path}:{text.count(chr(10)) + 1}: JSON array not closed")
        if text[pos] == closing:
            return rows
        line = text.count("\n", 0, pos) + 1
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{err.lineno}: broken JSON ({err.msg} at column {err.colno})") from None
        except RecursionError:
            raise UserError(f"{path}:{line}: JSON nested too deeply") from None
        except ValueError as err:
            raise UserError(f"{path}:{line}: broken JSON ({err})") from None
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
