"""Step data: the generic schema, PRM800K on real records, REVEAL, eQASC and PRMBench mappings, bad data, weighted
mixing, the synthetic set, and the numpy metrics against scipy / scikit-learn."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

from app.errors import UserError
from app.tasks.confidence_head.step_data import main as step_data_main
from app.tasks.confidence_head.step_data import convert, mix, read_step_file, synthetic_example, write_synthetic


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


GOOD = {"problem": "Calculate 2+2.", "steps": ["Add the numbers together.", "The result is 4."], "labels": [1.0, 1]}


# --- generic ------------------------------------------------------------------------------------------------------
def test_generic_reads_labels_null_and_id(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD, "", {**GOOD, "labels": [0.25, None], "id": 7}])
    rows = read_step_file(path)
    assert [r.line for r in rows] == [1, 3]
    assert rows[0].values["labels"] == [1.0, 1.0] and rows[1].values["labels"] == [0.25, None]
    assert rows[1].values["id"] == "7" and rows[0].values["format"] == "generic"
    assert rows[0].values["source"] == str(path)


def test_generic_json_array_keeps_lines(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("[\n" + json.dumps(GOOD) + ",\n\n" + json.dumps(GOOD) + "\n]\n", encoding="utf-8")
    assert [r.line for r in read_step_file(path)] == [2, 4]


@pytest.mark.parametrize("record, message", [
    ({**GOOD, "labels": [1.0]}, "labels has 1 entries but steps has 2"),
    ({**GOOD, "labels": [1.0, 1.5]}, "labels[1] = 1.5 is outside [0, 1]"),
    ({**GOOD, "labels": [-0.1, 1.0]}, "labels[0] = -0.1 is outside [0, 1]"),
    ({**GOOD, "labels": [1.0, "yes"]}, "labels[1] must be a number in [0, 1] or null"),
    ({**GOOD, "labels": [True, 1.0]}, "labels[0] must be a number"),
    ({**GOOD, "steps": ["Add them. <CONFIDENCE>", "It is 4."]}, "steps[0] contains the step marker '<CONFIDENCE>'"),
    ({**GOOD, "problem": "What is <CONFIDENCE>?"}, "problem contains the step marker"),
    ({**GOOD, "steps": ["Add them.", "  "]}, "steps[1] must be non-empty text"),
    ({**GOOD, "steps": []}, "steps must be a non-empty list"),
    ({"problem": "x", "labels": [1.0]}, "missing key 'steps'"),
    ({"problem": "x", "steps": ["a"]}, "labels missing"),
])
def test_bad_data_is_one_line_naming_file_and_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, record])
    with pytest.raises(UserError) as err:
        read_step_file(path)
    text = str(err.value)
    assert text.startswith(f"{path}:3: ") and message in text and "\n" not in text


def test_broken_json_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, '{"problem": "x", "steps": [', GOOD])
    with pytest.raises(UserError, match=rf"^{path}:2: broken JSON line"):
        read_step_file(path)


def test_labels_are_optional_for_scoring(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"problem": "p", "steps": ["a", "b"]}])
    assert read_step_file(path, require_labels=False)[0].values["labels"] == [None, None]


def test_train_command_reports_bad_data_before_loading_a_model(tmp_path, capsys):
    from app.__main__ import main

    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, {**GOOD, "labels": [0.5, 2]}])
    code = main(["train", str(ROOT / "configs/confidence_head_tiny.py"), f"--train_file={path}",
                 f"--model_name={tmp_path / 'no-model'}", "--create_tiny_model=False", f"--out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: {path}:2: labels[1] = 2 is outside [0, 1]\n"
    assert not (tmp_path / "no-model").exists()


# --- PRM800K ------------------------------------------------------------------------------------------------------
def test_prm800k_mapping_on_real_records(shared_fixtures):
    path = shared_fixtures / "prm800k" / "samples.jsonl"
    raw = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = read_step_file(path)
    assert [r.values["format"] for r in rows] == ["prm800k"] * 3 and [r.line for r in rows] == [1, 2, 3]
    for row, rec in zip(rows, raw):
        assert row.values["problem"] == rec["question"]["problem"]

    steps0 = raw[0]["label"]["steps"]
    # record 1 (solution): step 2's completions are all rated -1 and none was chosen: the labeller's unrated human
    # completion continues the trajectory, without a label; the last step is chosen_completion 4 (rating 1)
    assert rows[0].values["labels"] == [1.0, None, 1.0, 1.0, 1.0, 1.0]
    assert rows[0].values["steps"][1] == steps0[1]["human_completion"]["text"] == "We have $3p+e=1.24$ and $5p+e=1.82$."
    assert rows[0].values["steps"][5] == steps0[5]["completions"][4]["text"]
    assert rows[0].values["steps"][0] == steps0[0]["completions"][0]["text"]

    # record 2 (found_error): a rating-0 step maps to 0.5; the trajectory ends with the completion rated -1
    assert raw[1]["label"]["finish_reason"] == "found_error"
    assert rows[1].values["labels"] == [1.0, 0.5, 1.0, 1.0, 1.0, 1.0, 0.0]
    last = raw[1]["label"]["steps"][6]
    assert last["chosen_completion"] is None and last["human_completion"] is None
    assert rows[1].values["steps"][6] == last["completions"][0]["text"] and last["completions"][0]["rating"] == -1

    # record 3 (solution): chosen_completion 1 of the last step (its completion 0 is rated 0 and not on the path)
    assert rows[2].values["labels"] == [1.0] * 5
    assert rows[2].values["steps"][4] == raw[2]["label"]["steps"][4]["completions"][1]["text"]


def test_prm800k_bad_problem_skipped_and_bad_rating_named(tmp_path, shared_fixtures):
    rec = json.loads((shared_fixtures / "prm800k" / "samples.jsonl").read_text().splitlines()[0])
    skipped = json.loads(json.dumps(rec))
    skipped["label"]["finish_reason"] = "bad_problem"
    bad = json.loads(json.dumps(rec))
    bad["label"]["steps"][2]["completions"][0]["rating"] = 2
    assert len(read_step_file(write_jsonl(tmp_path / "a.jsonl", [skipped, rec]))) == 1
    with pytest.raises(UserError, match=r"b\.jsonl:2: label\.steps\[2\]: rating must be -1, 0, 1 or null, found 2"):
        read_step_file(write_jsonl(tmp_path / "b.jsonl", [rec, bad]))



def prm_records(shared_fixtures) -> list[dict]:
    return [json.loads(line) for line in (shared_fixtures / "prm800k" / "samples.jsonl").read_text().split("\n")
            if line.strip()]


def test_prm800k_give_up_ends_at_the_null_step(tmp_path, shared_fixtures):
    """A real give_up session ends with a step whose completions, chosen_completion and human_completion are null."""
    rec = prm_records(shared_fixtures)[2]
    give_up = json.loads(json.dumps(rec))
    give_up["label"]["finish_reason"] = "give_up"
    give_up["label"]["steps"] = rec["label"]["steps"][:3] + [
        {"completions": None, "human_completion": None, "chosen_completion": None}]
    rows = read_step_file(write_jsonl(tmp_path / "g.jsonl", [rec, give_up]))
    assert len(rows) == 2 and rows[1].line == 2
    assert rows[1].values["steps"] == rows[0].values["steps"][:3] and rows[1].values["labels"] == [1.0, 1.0, 1.0]
    # a null step in the middle ends the trajectory there too
    middle = json.loads(json.dumps(give_up))
    middle["label"]["steps"].insert(1, {"completions": None, "human_completion": None, "chosen_completion": None})
    assert read_step_file(write_jsonl(tmp_path / "m.jsonl", [middle]))[0].values["labels"] == [1.0]
    # null completions and a chosen index is still an error naming the step
    wrong = json.loads(json.dumps(give_up))
    wrong["label"]["steps"][3]["chosen_completion"] = 0
    with pytest.raises(UserError, match=r"w\.jsonl:1: label\.steps\[3\]: chosen_completion=0 is not an index"):
        read_step_file(write_jsonl(tmp_path / "w.jsonl", [wrong]))


def test_prm800k_pretty_printed_records_read(tmp_path, shared_fixtures):
    records = prm_records(shared_fixtures)
    for name in ("shared.json", "shared.jsonl"):
        path = tmp_path / name
        path.write_text("\n".join(json.dumps(r, indent=2) for r in records) + "\n", encoding="utf-8")
        rows = read_step_file(path)
        expected = read_step_file(shared_fixtures / "prm800k" / "samples.jsonl")
        assert [r.values["labels"] for r in rows] == [r.values["labels"] for r in expected]
        assert rows[0].line == 1 and rows[1].line > 20 and rows[2].line > rows[1].line


@pytest.mark.parametrize("rating", [[1], {"value": 1}, "1", True, 0.5, 2])
def test_prm800k_rating_of_the_wrong_type_names_file_line_and_step(tmp_path, shared_fixtures, rating):
    records = prm_records(shared_fixtures)
    bad = json.loads(json.dumps(records[0]))
    bad["label"]["steps"][3]["completions"][0]["rating"] = rating
    path = write_jsonl(tmp_path / "r.jsonl", [records[1], bad])
    with pytest.raises(UserError) as err:
        read_step_file(path)
    assert str(err.value) == f"{path}:2: label.steps[3]: rating must be -1, 0, 1 or null, found {rating!r}"


def test_prm800k_completions_of_the_wrong_type(tmp_path, shared_fixtures):
    bad = json.loads(json.dumps(prm_records(shared_fixtures)[0]))
    bad["label"]["steps"][1]["completions"] = "text"
    with pytest.raises(UserError, match=r"c\.jsonl:1: label\.steps\[1\]: completions must be a list or null"):
        read_step_file(write_jsonl(tmp_path / "c.jsonl", [bad]))
    del bad["label"]["steps"][1]["completions"]
    with pytest.raises(UserError, match=r"c\.jsonl:1: label\.steps\[1\]: completions missing"):
        read_step_file(write_jsonl(tmp_path / "c.jsonl", [bad]))


def test_generic_step_text_with_u2028_reads(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps({**GOOD, "steps": ["Add\u2028the numbers.", "It is\u20294."]}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    assert read_step_file(path)[0].values["steps"] == ["Add\u2028the numbers.", "It is\u20294."]

# --- REVEAL -------------------------------------------------------------------------------------------------------
REVEAL_COLUMNS = ["answer_id", "question", "step_idx", "step", "type", "relevance_label", "attribution_label",
                  "correctness_label", "evidence"]


def reveal_rows() -> list[list]:
    q = "Can an art dealer buy a Boeing 737-800 with a Da Vinci painting?"
    return [
        ["a1", q, 1, "A Boeing 737-800 costs around $90 million.", "Attribution step", "Relevant", "Contradictory", "", "e1"],
        ["a1", q, 1, "A Boeing 737-800 costs around $90 million.", "Attribution step", "Relevant", "Unsupported", "", "e2"],
        ["a1", q, 0, "Da Vinci paintings sell for hundreds of millions.", "Attribution step", "Relevant", "Fully", "", "e3"],
        ["a1", q, 0, "Da Vinci paintings sell for hundreds of millions.", "Attribution step", "Relevant", "Partially", "", "e4"],
        ["a1", q, 2, "Thus the dealer could buy one.", "Logical step", "Relevant", "", "Correct", ""],
        ["a2", q, 0, "Prices vary.", "Attribution step", "Not relevant", "Unsupported", "", "e5"],
        ["a2", q, 1, "So no.", "Logical step.", "Relevant", "", "incorrect", ""],
        ["a2", q, 2, "Both kinds.", "Both", "Relevant", "Fully", "Incorrect", "e6"],
    ]


def test_reveal_mapping(tmp_path):
    path = tmp_path / "reveal_eval.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(REVEAL_COLUMNS)
        w.writerows(reveal_rows())
    rows = read_step_file(path)
    assert [r.values["format"] for r in rows] == ["reveal", "reveal"]
    a1, a2 = rows
    assert a1.line == 2 and a2.line == 7  # the CSV line of each answer's first row
    assert a1.values["steps"] == ["Da Vinci paintings sell for hundreds of millions.",
                                  "A Boeing 737-800 costs around $90 million.", "Thus the dealer could buy one."]
    # best attribution over passages (fully > partially), contradicted beats unsupported, logic correct -> 1
    assert a1.values["labels"] == [1.0, 0.0, 1.0]
    # unsupported only -> unlabelled; incorrect -> 0; both types -> the lower of the two
    assert a2.values["labels"] == [None, 0.0, 0.0]


def test_reveal_unknown_label_is_named(tmp_path):
    path = tmp_path / "reveal.jsonl"
    rows = [dict(zip(REVEAL_COLUMNS, r)) for r in reveal_rows()]
    rows[3]["attribution_label"] = "Mostly"
    write_jsonl(path, rows)
    with pytest.raises(UserError, match=r"reveal\.jsonl:4: attribution_label 'Mostly' is not one of"):
        read_step_file(path)


# --- eQASC --------------------------------------------------------------------------------------------------------
def eqasc_question(qid: str, labels: list) -> dict:
    chains = [[{"text": f"fact one {k}"}, {"text": f"fact two {k}"}, {"turk_label": {"label": lab}, "score": 50.0}]
              for k, lab in enumerate(labels)]
    return {"id": qid, "answerKey": "B", "fact1": "f1", "fact2": "f2", "combinedfact": "cf",
            "question": {"stem": "What do plants need?", "choices": [
                {"label": "A", "text": "rocks", "chains": [[{"text": "x"}, {"text": "y"}, {"turk_label": {"label": "yes"}}]]},
                {"label": "B", "text": "sunlight", "chains": chains}]}}


def test_eqasc_mapping(tmp_path):
    path = tmp_path / "eqasc_train_grc.json"
    path.write_text(json.dumps([eqasc_question("q1", ["yes", "no", None]), eqasc_question("q2", ["fact1"])], indent=1),
                    encoding="utf-8")
    rows = read_step_file(path)
    assert [r.values["format"] for r in rows] == ["eqasc"] * 3
    first = rows[0].values
    assert first["problem"] == "What do plants need?"
    assert first["steps"] == ["fact one 0", "fact two 0", "So the answer is sunlight."]
    assert first["labels"] == [None, None, 1.0] and first["id"] == "q1/0"
    assert rows[1].values["labels"] == [None, None, 0.0]  # "no"; the unlabelled third chain is skipped
    assert rows[2].values["labels"] == [None, None, 0.0] and rows[2].values["id"] == "q2/0"  # "fact1": negative
    assert rows[0].line == 2 and rows[2].line > rows[0].line  # the line each question object starts on


# --- PRMBench -----------------------------------------------------------------------------------------------------
PENCILS = "Three pencils and an eraser cost $1.24; five pencils and an eraser cost $1.82. What does a pencil cost?"
PENCIL_STEPS = ["1. Let p be a pencil's price and e the eraser's: 3p+e=1.24 and 5p+e=1.82.",
                "2. Subtracting gives 2p=0.58.", "3. So p=0.29: a pencil costs 29 cents."]


def prmbench_records() -> list[dict]:
    """Three records as PRMBench releases them: two modify the same solution (a circular and a redundant one), the
    third has no modified_question and no error step."""
    circular = {"idx": "circular_0", "classification": "circular", "question": PENCILS, "original_question": PENCILS,
                "modified_question": PENCILS, "original_process": PENCIL_STEPS,
                "modified_process": [PENCIL_STEPS[0], "2. Assume a pencil costs 29 cents.",
                                     "3. Then 3(0.29)+e=1.24 gives e=0.37.", "4. And 5(0.29)+0.37=1.82: it checks."],
                "modified_steps": [2, 3, 4], "error_steps": [2, 3], "reason": "assumes the answer"}
    redundant = {**circular, "idx": "redundency_0", "classification": "redundency",
                 "modified_process": [*PENCIL_STEPS[:2], "3. Note that 0.58 is 58 cents.", PENCIL_STEPS[2]],
                 "modified_steps": [3], "error_steps": [3], "reason": "a step that adds nothing"}
    squares = {"idx": "confidence_1", "classification": "confidence", "question": "What is 3 squared?",
               "original_question": "What is 3 squared?", "original_process": ["1. 3*3=9."],
               "modified_process": ["1. 3*3=9, certainly."], "modified_steps": [1], "error_steps": [],
               "reason": "none"}
    return [circular, redundant, squares]


def test_prmbench_original_and_modified_processes_with_their_labels(tmp_path):
    rows = read_step_file(write_jsonl(tmp_path / "prmbench.jsonl", prmbench_records()))
    got = [(r.line, r.values["id"], r.values["problem"], r.values["steps"], r.values["labels"]) for r in rows]
    circular, redundant, squares = prmbench_records()
    assert got == [
        (1, "circular_0/original", PENCILS, PENCIL_STEPS, [1.0, 1.0, 1.0]),
        (1, "circular_0/modified", PENCILS, circular["modified_process"], [1.0, 0.0, 0.0, 1.0]),  # 1-based 2, 3
        (2, "redundency_0/modified", PENCILS, redundant["modified_process"], [1.0, 1.0, 0.0, 1.0]),  # shared original once
        (3, "confidence_1/original", "What is 3 squared?", ["1. 3*3=9."], [1.0]),
        (3, "confidence_1/modified", "What is 3 squared?", ["1. 3*3=9, certainly."], [1.0]),
    ]
    assert {r.values["format"] for r in rows} == {"prmbench"}


def test_prmbench_through_steps_convert(tmp_path, capsys):
    from app.cli import main

    src = write_jsonl(tmp_path / "prmbench.jsonl", prmbench_records())
    assert main(["steps", "convert", str(src), str(tmp_path / "auto.jsonl")]) == 0
    assert capsys.readouterr().out == f"wrote 5 examples to {tmp_path / 'auto.jsonl'}\n"
    assert main(["steps", "convert", str(src), str(tmp_path / "named.jsonl"), "--format", "prmbench"]) == 0
    assert (tmp_path / "named.jsonl").read_bytes() == (tmp_path / "auto.jsonl").read_bytes()
    lines = [json.loads(x) for x in (tmp_path / "auto.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [x["labels"] for x in lines] == [[1.0] * 3, [1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 1.0], [1.0], [1.0]]
    assert [x["steps"][0] for x in lines] == [PENCIL_STEPS[0]] * 3 + ["1. 3*3=9.", "1. 3*3=9, certainly."]
    assert all(set(x) == {"problem", "steps", "labels"} for x in lines)


@pytest.mark.parametrize("change, message", [
    ({"error_steps": [0]}, "error_steps has 0, not a step number of modified_process (1 to 4; PRMBench numbers "
                           "steps from 1)"),
    ({"error_steps": [5]}, "error_steps has 5, not a step number of modified_process (1 to 4"),
    ({"error_steps": [True]}, "error_steps has True"),
    ({"error_steps": "2, 3"}, "error_steps must be a list of step numbers, found '2, 3'"),
    ({"modified_process": []}, "modified_process must be a non-empty list of steps, found []"),
    ({"original_process": ["1. fine", 7]}, "original_process[1] must be non-empty text, found 7"),
    ({"modified_process": ["1. a", "2. <CONFIDENCE>", "3. b", "4. c"]}, "steps[1] contains the step marker"),
    ({"question": None, "original_question": None, "modified_question": None},
     "no question text (expected original_question or question)"),
    ({"error_steps": None}, "missing key 'error_steps' (PRMBench records need original_process, modified_process, "
                            "error_steps)"),
])
def test_prmbench_bad_record_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, change, message):
    from app.cli import main

    records = prmbench_records()
    bad = {k: v for k, v in {**records[0], **change}.items() if k != "error_steps" or v is not None}
    src = write_jsonl(tmp_path / "prmbench.jsonl", [records[2], bad])
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["steps", "convert", str(src), str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {src}:2: {message}") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_prmbench_file_named_in_step_formats_trains(tmp_path):
    from app.config import load_config
    from app.tasks import get_task

    src = write_jsonl(tmp_path / "prm.jsonl", prmbench_records())
    cfg = load_config(ROOT / "configs/confidence_head_tiny.py", [f"--step_train_files={{'{src}': 1.0}}",
                                                                 f"--step_formats={{'{src}': 'prmbench'}}",
                                                                 f"--out_dir={tmp_path / 'r'}"])
    rows = get_task("confidence_head").load_rows(cfg, "train")
    assert [r.values["labels"] for r in rows] == [[1.0] * 3, [1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 1.0], [1.0], [1.0]]


def test_unknown_format_is_reported(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"premise": "a", "hypothesis": "b"}])
    with pytest.raises(UserError, match="cannot tell the format"):
        read_step_file(path)


def test_convert_writes_generic(tmp_path, shared_fixtures, capsys):
    out = tmp_path / "prm.jsonl"
    assert step_data_main(["convert", str(shared_fixtures / "prm800k" / "samples.jsonl"), str(out)]) == 0
    assert capsys.readouterr().out == f"wrote 3 examples to {out}\n"
    rows = read_step_file(out)
    assert [r.values["format"] for r in rows] == ["generic"] * 3 and rows[0].values["labels"][1] is None
    again = tmp_path / "sub" / "again.jsonl"
    assert convert(shared_fixtures / "prm800k" / "samples.jsonl", again, fmt="prm800k") == 3
    assert again.read_bytes() == out.read_bytes()


def test_convert_errors_are_one_line_and_leave_nothing(tmp_path, shared_fixtures, capsys):
    src = shared_fixtures / "prm800k" / "samples.jsonl"
    (tmp_path / "file").write_text("x")
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, {**GOOD, "labels": [0.5, 2]}])
    cases = [
        ([str(src), str(tmp_path)], f"{tmp_path}: is a directory"),
        ([str(src), str(tmp_path / "file" / "out.jsonl")], f"{tmp_path / 'file' / 'out.jsonl'}: cannot create its folder"),
        ([str(bad), str(bad)], f"{bad}: the output is the input file"),
        ([str(bad), str(tmp_path / "o.jsonl")], f"{bad}:2: labels[1] = 2 is outside [0, 1]"),
        ([str(tmp_path / "none.jsonl"), str(tmp_path / "o.jsonl")], "none.jsonl: file not found"),
        ([str(src), str(tmp_path / "o.jsonl"), "--format=csv"], "--format=csv: unknown step data format"),
        ([str(src), str(tmp_path / "o.jsonl"), "--fmt=x"], "usage:"),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, message in cases:
        assert step_data_main(["convert", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary or partial output


# --- weighted mixing ----------------------------------------------------------------------------------------------
def test_mix_is_weighted_deterministic_and_cycles_without_repeats():
    from app.data import Row

    a = [Row(i, {"source": "a", "k": i}) for i in range(50)]
    b = [Row(i, {"source": "b", "k": i}) for i in range(500)]
    drawn = mix([("a", 3.0, a), ("b", 1.0, b)], 4000, seed=5)
    assert drawn == mix([("a", 3.0, a), ("b", 1.0, b)], 4000, seed=5)
    assert drawn != mix([("a", 3.0, a), ("b", 1.0, b)], 4000, seed=6)
    share = sum(r.values["source"] == "a" for r in drawn) / len(drawn)
    assert abs(share - 0.75) < 0.03
    from_a = [r.values["k"] for r in drawn if r.values["source"] == "a"]
    assert sorted(from_a[:50]) == list(range(50))  # every row once before any repeats


def test_task_mixes_several_files(tmp_path):
    from app.config import load_config
    from app.tasks import get_task

    f1 = write_jsonl(tmp_path / "one.jsonl", [{**GOOD, "problem": f"one {i}"} for i in range(20)])
    f2 = write_jsonl(tmp_path / "two.jsonl", [{**GOOD, "problem": f"two {i}"} for i in range(20)])
    args = [f"--step_train_files={{'{f1}': 1.0, '{f2}': 4}}", "--step_mix_size=500", f"--out_dir={tmp_path / 'r'}"]
    cfg = load_config(ROOT / "configs/confidence_head_tiny.py", args)
    task = get_task("confidence_head")
    rows = task.load_rows(cfg, "train")
    assert len(rows) == 500 and rows == task.load_rows(cfg, "train")
    share = sum(r.values["problem"].startswith("two") for r in rows) / 500
    assert 0.72 < share < 0.88
    bad = load_config(ROOT / "configs/confidence_head_tiny.py", [f"--step_train_files={{'{f1}': 0}}"])
    with pytest.raises(UserError, match="weight of .* must be a positive number"):
        task.load_rows(bad, "train")


# --- the synthetic set --------------------------------------------------------------------------------------------
def test_synthetic_set_is_deterministic_and_shipped(tmp_path):
    write_synthetic(tmp_path)
    for split in ("train", "dev"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (ROOT / "data/sample/steps" / f"{split}.jsonl").read_bytes()
    ex = synthetic_example(random.Random(0))
    for step, label in zip(ex["steps"], ex["labels"]):
        assert step.endswith("They agree.") == (label == 1.0)


# --- metrics against the references -------------------------------------------------------------------------------
def test_metrics_match_scipy_and_sklearn():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import roc_auc_score

    from app.tasks.confidence_head.metrics import auroc, pearson, spearman, step_metrics

    rng = np.random.default_rng(0)
    y = rng.choice([0.0, 0.5, 1.0], size=300)
    s = np.round(np.clip(y * 0.6 + rng.normal(0.2, 0.2, size=300), 0, 1), 2)  # rounded: ties
    assert pearson(s, y) == pytest.approx(pearsonr(s, y)[0], abs=1e-12)
    assert spearman(s, y) == pytest.approx(spearmanr(s, y)[0], abs=1e-12)
    assert auroc(s, y >= 0.5) == pytest.approx(roc_auc_score(y >= 0.5, s), abs=1e-12)
    m = step_metrics(s, y)
    assert m["mse"] == pytest.approx(np.mean((s - y) ** 2)) and m["mae"] == pytest.approx(np.mean(np.abs(s - y)))
    assert 0 <= m["ece"] <= 1 and m["steps"] == 300
    assert math.isnan(auroc([0.1, 0.2], [True, True])) and math.isnan(pearson([1, 1, 1], [0, 1, 0]))
