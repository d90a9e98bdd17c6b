"""NLI data: good files read (BOM included), bad files fail with one line naming file and line, exit 2."""

from __future__ import annotations

import pytest

from app.data import read_rows
from app.errors import UserError
from app.tasks import get_task
from conftest import run_app

HEADER = "premise,hypothesis,label,thought_process\n"


def write(tmp_path, name, content: bytes | str):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def load(path):
    task = get_task("nli_cot")
    return task.validate(str(path), read_rows(path, task.required_columns), None)


def test_csv_and_jsonl_read(tmp_path):
    rows = load(write(tmp_path, "a.csv", HEADER + 'A cat sleeps.,"An animal sleeps, calmly.",1,\nx,y,0,because\n'))
    assert [r.values["label"] for r in rows] == [1, 0] and rows[0].values["hypothesis"] == "An animal sleeps, calmly."
    assert [r.line for r in rows] == [2, 3]
    rows = load(write(tmp_path, "a.jsonl", '{"premise": "p", "hypothesis": "h", "label": true}\n\n'
                                             '{"premise": "p", "hypothesis": "h", "label": 0, "extra": 3}\n'))
    assert [r.values["label"] for r in rows] == [1, 0] and [r.line for r in rows] == [1, 3]


def test_bom_header_reads(shared_fixtures):
    path = shared_fixtures / "nli" / "NLI_trial.csv"
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    rows = load(path)
    assert len(rows) == 50 and set(rows[0].values) >= {"premise", "hypothesis", "label"}
    assert {r.values["label"] for r in rows} == {0, 1}


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("missing.csv", "premise,label\np,1\n", "missing.csv:1: missing column(s) hypothesis"),
        ("empty.csv", "", "empty.csv: file is empty"),
        ("header_only.csv", HEADER, "header_only.csv: no data rows"),
        ("label.csv", HEADER + "p,h,1,\np,h,2,\n", "label.csv:3: label must be 0 or 1, found '2'"),
        ("bytes.csv", HEADER.encode() + b"p,h,1,\np\xff\xfe,h,0,\n", "bytes.csv:3: not valid UTF-8"),
        ("broken.jsonl", '{"premise": "p", "hypothesis": "h", "label": 1}\n{"premise": "p", \n', "broken.jsonl:2: broken JSON"),
        ("fields.csv", HEADER + "p,h,1,t,extra\n", "fields.csv:2: expected 4 fields"),
        ("dup.csv", "premise,hypothesis,label,premise\np,h,1,q\n", "dup.csv:1: column 'premise' appears more than once"),
        ("dup_spaced.csv", "premise, label,hypothesis,label \np,1,h,0\n", "dup_spaced.csv:1: column 'label' appears"),
        ("deep.jsonl", '{"premise": "p", "hypothesis": "h", "label": 1}\n{"x": ' + "[" * 10000 + "]" * 10000 + "}\n",
         "deep.jsonl:2: JSON nested too deeply"),
        ("deep.json", '[\n{"label": 1},\n{"x": ' + "[" * 10000 + "]" * 10000 + "}]\n", "deep.json:3: JSON nested too deeply"),
        ("deep_pretty.jsonl", '{\n  "x": ' + "{\"a\": " * 10000 + "1" + "}" * 10000 + "\n}\n",
         "deep_pretty.jsonl:1: JSON nested too deeply"),
        ("digits.jsonl", '{"premise": "p", "hypothesis": "h", "label": ' + "1" * 5000 + "}\n", "digits.jsonl:1: broken JSON"),
        ("scalar.jsonl", '{"premise": "p", "hypothesis": "h", "label": 1}\n[1, 2]\n', "scalar.jsonl:2: expected a JSON object"),
        ("pretty_broken.jsonl", '{\n "premise": "p",\n "hypothesis": "h",\n "label": 1\n}\n{\n "premise": "q",,\n}\n',
         "pretty_broken.jsonl:7: broken JSON"),
        ("first_line.jsonl", '{"premise": "p", "hypothesis": \n{"premise": "q"}\n', "first_line.jsonl:1: broken JSON line"),
    ],
)
def test_bad_data_is_one_line_naming_file_and_line(tmp_path, name, content, expected):
    path = write(tmp_path, name, content)
    with pytest.raises(UserError) as err:
        load(path)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_bad_data_exits_2_before_any_model_loads(tmp_path):
    bad = write(tmp_path, "bad.csv", HEADER + "p,h,1,\np,h,7,\n")
    # model_name points nowhere: the data error must come first
    r = run_app("train", "configs/tiny.py", f"--train_file={bad}", f"--model_name={tmp_path / 'no-model'}",
                "--create_tiny_model=False", f"--out_dir={tmp_path / 'run'}", timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"error: {bad}:3: label must be 0 or 1, found '7'"
    assert not (tmp_path / "run").exists()


def test_jsonl_lines_end_at_newline_only(tmp_path):
    """U+2028/U+2029/U+0085 are valid inside JSON strings: str.splitlines() would cut the line there."""
    rows = load(write(tmp_path, "u.jsonl", '{"premise": "a\u2028b", "hypothesis": "c\u2029d\u0085", "label": 1}\r\n'
                                             '\r\n{"premise": "p", "hypothesis": "h", "label": 0}'))
    assert [r.line for r in rows] == [1, 3]
    assert rows[0].values["premise"] == "a\u2028b" and rows[0].values["hypothesis"] == "c\u2029d\u0085"


def test_pretty_printed_objects_one_after_another(tmp_path):
    import json

    records = [{"premise": "p", "hypothesis": "h", "label": 1}, {"premise": "q", "hypothesis": "i", "label": 0}]
    path = write(tmp_path, "pretty.jsonl", "\n" + "\n".join(json.dumps(r, indent=2) for r in records) + "\n")
    rows = load(path)
    assert [r.values["label"] for r in rows] == [1, 0] and [r.line for r in rows] == [2, 7]


@pytest.mark.parametrize("kind", ["missing", "directory", "unreadable", "fifo"])
def test_input_that_cannot_be_read(tmp_path, monkeypatch, kind):
    import os
    from pathlib import Path

    path = tmp_path / "in.csv"
    if kind == "directory":
        path.mkdir()
        expected = f"{path}: is a directory, not a file"
    elif kind == "unreadable":  # tests run as root, where chmod 000 still reads: the read itself is refused here
        write(tmp_path, "in.csv", HEADER + "p,h,1,\n")
        real = Path.read_bytes

        def refuse(self):
            if self == path:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(Path, "read_bytes", refuse)
        expected = f"{path}: cannot read (Permission denied)"
    elif kind == "fifo":
        os.mkfifo(path)
        expected = f"{path}: not a regular file"
    else:
        expected = f"{path}: file not found"
    with pytest.raises(UserError) as err:
        read_rows(path)
    assert str(err.value) == expected
