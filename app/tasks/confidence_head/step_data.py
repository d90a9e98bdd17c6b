"""Step-labelled reasoning data: a problem, its solution steps and one confidence label per step.

Every reader returns `app.data.Row`s whose values hold
    problem: str, steps: list[str], labels: list[float | None], source: str (the file), format: str
(`None`: the step stays in the text but carries no loss and counts in no metric), plus `id` when the input has one.
Errors name the file and line, in one line (`app.errors.UserError`).

Formats (`read_step_file(path, fmt="auto")` tells them apart by their first record):

generic   JSONL (or a JSON array), one solution per line:
              {"problem": "...", "steps": ["...", ...], "labels": [1.0, 0.0, ...]}
          a label is a number in [0, 1] or null (unlabelled); `labels` may be left out where labels are optional
          (scoring). An optional "id" is carried through.

prm800k   PRM800K in its original schema (one labelling session per line: `question.problem`, `label.steps[]` with
          `completions[]` (`text`, `rating` -1/0/1 or null), `chosen_completion`, `human_completion`, and
          `label.finish_reason`), as JSON lines or as the pretty-printed records shared in examples (objects one
          after another, each over many lines). Mapping, one trajectory per record:
          - the trajectory follows each step's `chosen_completion`; where it is null and the labeller wrote a
            `human_completion`, that text continues the trajectory; where both are null the trajectory ends there,
            with the first completion rated -1 as its last step when there is one (that is how a `found_error`
            session ends), else without that step (`give_up` sessions, whose last step has `completions: null`,
            and unrated ends);
          - rating 1 -> 1.0, 0 -> 0.5, -1 -> 0.0, null -> unlabelled (kept as context: a human completion is
            usually unrated);
          - records with finish_reason `bad_problem`, or with no step on the trajectory, are skipped; the rejected
            alternative completions are not used.

reveal    REVEAL (Jacovi et al. 2024, "A Chain-of-Thought Is as Strong as Its Weakest Link"), its CSV or JSONL
          release: one row per (answer, step, evidence passage). Columns used: `answer_id`, `question`, `step_idx`,
          `step`, `type`, `attribution_label`, `correctness_label`. Rows are grouped by `answer_id` (in order of
          first appearance) and ordered by `step_idx`; the rows of one step (one per evidence passage) merge.
          Mapping to the probability that a step is right:
          - logical steps (`type` mentions "logical"): `correctness_label` correct -> 1.0, incorrect -> 0.0;
          - attribution steps (`type` mentions "attribution"): the best `attribution_label` over the step's
            passages: fully (attributable) -> 1.0, partially -> 0.5, contradictory -> 0.0, unsupported / empty ->
            unlabelled (the evidence does not decide);
          - a step of both types: the lower of the two labels it has; `relevance_label` does not change the label.
          Label text is compared case-insensitively, without a trailing period; any other value is an error.

eqasc     eQASC (Jhamtani & Clark 2020), the released JSON array of QASC questions (or JSONL, one per line). Each
          reasoning chain on the correct answer (`answerKey`) becomes one example: problem = `question.stem`,
          steps = [fact 1, fact 2, "So the answer is <choice text>."], labels = [unlabelled, unlabelled, y] with
          y = 1.0 when the chain's `turk_label.label` is "yes" (a valid explanation) and 0.0 for "no", "not-quite",
          "unsure", "?", "fact12", "bad-answer", "fact1", "fact2" (the mapping of the eQASC reference reader:
          only "yes" is positive). Chains on wrong choices and chains without a turk label are skipped.

prmbench  PRMBench (Song et al. 2025; built on PRM800K), its JSONL release: one record per modified solution, with
          `original_question`, `original_process` (the steps of a correct solution), `modified_question`,
          `modified_process` (the same solution with errors put in), `error_steps` (1-based numbers of the steps of
          `modified_process` that are wrong), `modified_steps`, `classification`, `reason`, `idx`, `question`.
          Each record gives two examples:
          - the original: problem = `original_question` (else `question`), steps = `original_process`, every label
            1.0; an original that several records share (one per kind of error put in) is written once;
          - the modified: problem = `modified_question` (else the original's), steps = `modified_process`, label
            0.0 for the steps in `error_steps` and 1.0 for every other one, as PRMBench's own evaluation counts
            them (a modified step not in `error_steps` is right; for the redundancy and circular classes an error
            step is a redundant or circular one). Ids `<idx>/original` and `<idx>/modified`.
          The steps keep their text as released ("1. ...", "2. ...").

`python -m app.tasks.confidence_head.step_data synthetic DIR` writes the bundled synthetic set (data/sample/steps/);
`python -m app.tasks.confidence_head.step_data convert IN OUT [--format=F]` (and `python -m app steps convert`, through
`convert(in_path, out_path, fmt)`) writes any supported file as generic JSONL, atomically.
"""

from __future__ import annotations

import json
import math
import random
import sys
from collections.abc import Callable
from pathlib import Path

from app.data import Row, read_rows
from app.errors import UserError

FORMATS = ("generic", "prm800k", "reveal", "eqasc", "prmbench")
DEFAULT_MARKER = "<CONFIDENCE>"


# --- one example ----------------------------------------------------------------------------------------------
def parse_label(value, where: str, k: int) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where}: labels[{k}] must be a number in [0, 1] or null, found {value!r}")
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise UserError(f"{where}: labels[{k}] = {value!r} is outside [0, 1]")
    return float(value)


def check_example(path, line: int, problem, steps, labels, marker: str, require_labels: bool = True) -> dict:
    """Validate one example; the values of its Row. Raises UserError naming file and line."""
    where = f"{path}:{line}"
    if not isinstance(problem, str):
        raise UserError(f"{where}: problem must be text, found {type(problem).__name__}")
    if not isinstance(steps, list) or not steps:
        raise UserError(f"{where}: steps must be a non-empty list of strings")
    for k, step in enumerate(steps):
        if not isinstance(step, str) or not step.strip():
            raise UserError(f"{where}: steps[{k}] must be non-empty text, found {step!r}")
        if marker in step:
            raise UserError(f"{where}: steps[{k}] contains the step marker {marker!r}")
    if marker in problem:
        raise UserError(f"{where}: problem contains the step marker {marker!r}")
    if labels is None:
        if require_labels:
            raise UserError(f"{where}: labels missing (one label in [0, 1] or null per step)")
        labels = [None] * len(steps)
    elif not isinstance(labels, list):
        raise UserError(f"{where}: labels must be a list, found {type(labels).__name__}")
    if len(labels) != len(steps):
        raise UserError(f"{where}: labels has {len(labels)} entries but steps has {len(steps)}")
    return {"problem": problem, "steps": list(steps), "labels": [parse_label(v, where, k) for k, v in enumerate(labels)]}


# --- records --------------------------------------------------------------------------------------------------
def read_records(path: str | Path) -> list[Row]:
    """JSON objects of a JSONL file or of a JSON array (each with the line it starts on); CSV rows otherwise."""
    return read_rows(path)


def detect_format(path, first: dict) -> str:
    if "problem" in first and "steps" in first:
        return "generic"
    if "original_process" in first and "modified_process" in first:
        return "prmbench"
    if isinstance(first.get("question"), dict) and isinstance(first.get("label"), dict) and "steps" in first["label"]:
        return "prm800k"
    if "step_idx" in first and "step" in first:
        return "reveal"
    if isinstance(first.get("question"), dict) and "choices" in first["question"]:
        return "eqasc"
    raise UserError(f"{path}: cannot tell the format of the first record (keys: {', '.join(list(first)[:8])}); "
                    f"expected generic {{problem, steps, labels}}, PRM800K, REVEAL, eQASC or PRMBench (set step_formats)")


def read_step_file(path: str | Path, fmt: str = "auto", marker: str = DEFAULT_MARKER,
                   require_labels: bool = True) -> list[Row]:
    """Examples of one file in any supported format (see the module docstring for the mappings)."""
    records = read_records(path)
    if fmt == "auto":
        fmt = detect_format(path, records[0].values)
    if fmt not in READERS:
        raise UserError(f"{path}: unknown step data format {fmt!r} (known: {', '.join(FORMATS)})")
    rows = READERS[fmt](path, records, marker, require_labels)
    if not rows:
        raise UserError(f"{path}: no usable examples ({fmt} format)")
    for row in rows:
        row.values["source"], row.values["format"] = str(path), fmt
    return rows


# --- generic --------------------------------------------------------------------------------------------------
def _generic(path, records: list[Row], marker: str, require_labels: bool) -> list[Row]:
    rows = []
    for rec in records:
        v = rec.values
        for key in ("problem", "steps"):
            if key not in v:
                raise UserError(f"{path}:{rec.line}: missing key {key!r} (expected problem, steps, labels)")
        values = check_example(path, rec.line, v["problem"], v["steps"], v.get("labels"), marker, require_labels)
        if v.get("id") is not None:
            values["id"] = str(v["id"])
        rows.append(Row(rec.line, values))
    return rows


# --- PRM800K --------------------------------------------------------------------------------------------------
PRM_RATING = {1: 1.0, 0: 0.5, -1: 0.0}


def _prm_rating(completion: dict, where: str):
    rating = completion.get("rating")
    if rating is None:
        return None
    if isinstance(rating, bool) or not isinstance(rating, (int, float)) or rating not in PRM_RATING:
        raise UserError(f"{where}: rating must be -1, 0, 1 or null, found {_short(rating)}")
    return PRM_RATING[rating]


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def prm800k_trajectory(record: dict, where: str) -> tuple[list[str], list[float | None]] | None:
    """(steps, labels) of one PRM800K record under the documented mapping; None when the record is skipped."""
    question, label = record.get("question"), record.get("label")
    if not isinstance(question, dict) or not isinstance(question.get("problem"), str):
        raise UserError(f"{where}: question.problem missing (not a PRM800K record?)")
    if not isinstance(label, dict) or not isinstance(label.get("steps"), list):
        raise UserError(f"{where}: label.steps missing (not a PRM800K record?)")
    if label.get("finish_reason") == "bad_problem":
        return None
    steps, labels = [], []
    for k, step in enumerate(label["steps"]):
        at = f"{where}: label.steps[{k}]"
        if not isinstance(step, dict) or "completions" not in step:
            raise UserError(f"{at}: completions missing")
        completions, chosen, human = step["completions"], step.get("chosen_completion"), step.get("human_completion")
        if completions is None:  # the last step of a give_up session: nothing was generated or chosen there
            completions = []
        if not isinstance(completions, list):
            raise UserError(f"{at}: completions must be a list or null, found {type(completions).__name__}")
        if chosen is not None:
            if isinstance(chosen, bool) or not isinstance(chosen, int) or not 0 <= chosen < len(completions):
                raise UserError(f"{at}: chosen_completion={chosen!r} is not an index of its {len(completions)} completions")
            picked = completions[chosen]
        elif human is not None:
            picked = human
        else:
            picked = next((c for c in completions if isinstance(c, dict) and c.get("rating") == -1), None)
            if picked is not None:
                steps.append(picked.get("text"))
                labels.append(_prm_rating(picked, at))
            break
        if not isinstance(picked, dict):
            raise UserError(f"{at}: completion is not an object")
        steps.append(picked.get("text"))
        labels.append(_prm_rating(picked, at))
    return (steps, labels) if steps else None


def _prm800k(path, records: list[Row], marker: str, require_labels: bool) -> list[Row]:
    rows = []
    for rec in records:
        found = prm800k_trajectory(rec.values, f"{path}:{rec.line}")
        if found is None:
            continue
        steps, labels = found
        values = check_example(path, rec.line, rec.values["question"]["problem"], steps, labels, marker, require_labels)
        rows.append(Row(rec.line, values))
    return rows


# --- REVEAL ---------------------------------------------------------------------------------------------------
REVEAL_ATTRIBUTION = {"fully": 1.0, "fully attributable": 1.0, "partially": 0.5, "partially attributable": 0.5,
                      "contradictory": 0.0, "contradicts": 0.0, "contradiction": 0.0, "unsupported": None,
                      "not attributable": None, "none": None, "": None}
REVEAL_CORRECTNESS = {"correct": 1.0, "incorrect": 0.0, "": None, "none": None}


def _norm(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip().rstrip(".").strip().lower()


def _reveal(path, records: list[Row], marker: str, require_labels: bool) -> list[Row]:
    answers: dict[str, dict] = {}
    for rec in records:
        v, where = rec.values, f"{path}:{rec.line}"
        for key in ("answer_id", "step_idx", "step"):
            if key not in v:
                raise UserError(f"{where}: missing column {key!r} (REVEAL rows need answer_id, step_idx, step)")
        try:
            idx = int(float(v["step_idx"]))
        except (TypeError, ValueError, OverflowError):
            raise UserError(f"{where}: step_idx must be an integer, found {_short(v['step_idx'])}") from None
        answer = answers.setdefault(str(v["answer_id"]), {"line": rec.line, "question": v.get("question"), "steps": {}})
        step = answer["steps"].setdefault(idx, {"text": v["step"], "attr": [], "logic": [], "types": set()})
        kind = _norm(v.get("type"))
        if "attribution" in kind or "both" in kind:
            step["types"].add("attribution")
        if "logic" in kind or "both" in kind:
            step["types"].add("logical")
        attr, logic = _norm(v.get("attribution_label")), _norm(v.get("correctness_label"))
        if attr not in REVEAL_ATTRIBUTION:
            raise UserError(f"{where}: attribution_label {v.get('attribution_label')!r} is not one of "
                            "fully, partially, contradictory, unsupported")
        if logic not in REVEAL_CORRECTNESS:
            raise UserError(f"{where}: correctness_label {v.get('correctness_label')!r} is not correct or incorrect")
        step["attr"].append(REVEAL_ATTRIBUTION[attr])
        step["logic"].append(REVEAL_CORRECTNESS[logic])
    rows = []
    for answer in answers.values():
        steps, labels = [], []
        for idx in sorted(answer["steps"]):
            s = answer["steps"][idx]
            parts, types = [], s["types"] or {"attribution", "logical"}  # no type given: use what is labelled
            if "attribution" in types:
                known = [a for a in s["attr"] if a is not None]
                if known:
                    parts.append(max(known))
            if "logical" in types:
                known = [c for c in s["logic"] if c is not None]
                if known:
                    parts.append(min(known))
            steps.append(s["text"])
            labels.append(min(parts) if parts else None)
        problem = answer["question"] if isinstance(answer["question"], str) else ""
        rows.append(Row(answer["line"], check_example(path, answer["line"], problem, steps, labels, marker, require_labels)))
    return rows


# --- eQASC ----------------------------------------------------------------------------------------------------
EQASC_POSITIVE = {"yes"}
EQASC_NEGATIVE = {"no", "not-quite", "unsure", "?", "fact12", "bad-answer", "fact1", "fact2"}


def _eqasc(path, records: list[Row], marker: str, require_labels: bool) -> list[Row]:
    rows = []
    for rec in records:
        v, where = rec.values, f"{path}:{rec.line}"
        question = v.get("question")
        if not isinstance(question, dict) or not isinstance(question.get("choices"), list):
            raise UserError(f"{where}: question.choices missing (not an eQASC record?)")
        stem = question.get("stem")
        for choice in question["choices"]:
            if not isinstance(choice, dict) or choice.get("label") != v.get("answerKey"):
                continue
            for c, chain in enumerate(choice.get("chains") or []):
                if not isinstance(chain, list) or len(chain) < 2:
                    raise UserError(f"{where}: chain {c} of choice {choice.get('label')!r} is not [fact1, fact2, info]")
                info = chain[2] if len(chain) > 2 and isinstance(chain[2], dict) else {}
                turk = info.get("turk_label")
                label = turk.get("label") if isinstance(turk, dict) else turk
                if label is None:
                    continue
                label = str(label).strip().lower()
                if label in EQASC_POSITIVE:
                    y = 1.0
                elif label in EQASC_NEGATIVE:
                    y = 0.0
                else:
                    raise UserError(f"{where}: chain {c}: unknown turk_label {label!r}")
                facts = [chain[0].get("text") if isinstance(chain[0], dict) else chain[0],
                         chain[1].get("text") if isinstance(chain[1], dict) else chain[1]]
                steps = facts + [f"So the answer is {choice.get('text')}."]
                values = check_example(path, rec.line, stem, steps, [None, None, y], marker, require_labels)
                if v.get("id") is not None:
                    values["id"] = f"{v['id']}/{c}"
                rows.append(Row(rec.line, values))
    return rows


# --- PRMBench -------------------------------------------------------------------------------------------------
PRMBENCH_KEYS = ("original_process", "modified_process", "error_steps")


def _prmbench_process(v: dict, key: str, where: str) -> list[str]:
    steps = v[key]
    if not isinstance(steps, list) or not steps:
        raise UserError(f"{where}: {key} must be a non-empty list of steps, found {_short(steps)}")
    for k, step in enumerate(steps):
        if not isinstance(step, str) or not step.strip():
            raise UserError(f"{where}: {key}[{k}] must be non-empty text, found {_short(step)}")
    return steps


def prmbench_labels(error_steps, n: int, where: str) -> list[float]:
    """1.0 per step of a modified process of `n` steps, 0.0 at the 1-based step numbers of `error_steps`."""
    if not isinstance(error_steps, list):
        raise UserError(f"{where}: error_steps must be a list of step numbers, found {_short(error_steps)}")
    for e in error_steps:
        if isinstance(e, bool) or not isinstance(e, int) or not 1 <= e <= n:
            raise UserError(f"{where}: error_steps has {_short(e)}, not a step number of modified_process "
                            f"(1 to {n}; PRMBench numbers steps from 1)")
    wrong = set(error_steps)
    return [0.0 if k + 1 in wrong else 1.0 for k in range(n)]


def _prmbench_question(v: dict, keys: tuple[str, ...], where: str):
    found = next((v[k] for k in keys if isinstance(v.get(k), str)), None)
    if found is None:
        raise UserError(f"{where}: no question text (expected {' or '.join(keys)})")
    return found


def _prmbench(path, records: list[Row], marker: str, require_labels: bool) -> list[Row]:
    rows, originals = [], set()
    for rec in records:
        v, where = rec.values, f"{path}:{rec.line}"
        for key in PRMBENCH_KEYS:
            if key not in v:
                raise UserError(f"{where}: missing key {key!r} (PRMBench records need {', '.join(PRMBENCH_KEYS)})")
        original = _prmbench_process(v, "original_process", where)
        modified = _prmbench_process(v, "modified_process", where)
        labels = prmbench_labels(v["error_steps"], len(modified), where)
        question = _prmbench_question(v, ("original_question", "question"), where)
        modified_question = _prmbench_question(v, ("modified_question", "original_question", "question"), where)
        name = None if v.get("idx") is None else str(v["idx"])
        examples = []
        if (question, tuple(original)) not in originals:
            originals.add((question, tuple(original)))
            examples.append(("original", question, original, [1.0] * len(original)))
        examples.append(("modified", modified_question, modified, labels))
        for kind, problem, steps, step_labels in examples:
            values = check_example(path, rec.line, problem, steps, step_labels, marker, require_labels)
            if name is not None:
                values["id"] = f"{name}/{kind}"
            rows.append(Row(rec.line, values))
    return rows


READERS: dict[str, Callable] = {"generic": _generic, "prm800k": _prm800k, "reveal": _reveal, "eqasc": _eqasc,
                                "prmbench": _prmbench}


# --- weighted mixing ------------------------------------------------------------------------------------------
def mix(datasets: list[tuple[str, float, list[Row]]], size: int, seed: int) -> list[Row]:
    """`size` rows drawn from several datasets: each draw picks dataset d with probability w_d / sum(w), then that
    dataset's next row in a seeded shuffled order (reshuffled when used up, so no row repeats before all have been
    seen). Deterministic in (seed, weights, sizes)."""
    import numpy as np

    weights = np.array([w for _, w, _ in datasets], dtype=np.float64)
    rng = np.random.default_rng([seed, 0x57E9])
    picks = rng.choice(len(datasets), size=size, p=weights / weights.sum())
    orders = [[] for _ in datasets]
    out = []
    for d in picks.tolist():
        if not orders[d]:
            orders[d] = rng.permutation(len(datasets[d][2])).tolist()[::-1]
        out.append(datasets[d][2][orders[d].pop()])
    return out


# --- the synthetic sample set ---------------------------------------------------------------------------------
from app.tasks.sample_vocab import ACTIVITIES, NAMES, PLACES as _WHERE  # noqa: E402

PLACES = list(_WHERE)[:10]  # the step sample uses the first ten places


def synthetic_example(rng: random.Random) -> dict:
    """A made-up solution whose step correctness shows in the step's own text: a right step ends with the verdict
    "They agree." and a wrong one with "They differ.". As in real solutions, an error is not undone: the steps after
    the first wrong one are wrong too (half of the solutions go wrong, at a random step)."""
    name, activity = rng.choice(NAMES), rng.choice(ACTIVITIES)
    problem = f"Where is {name} {activity}?"
    n = rng.randint(2, 4)
    first_wrong = rng.randrange(n) if rng.random() < 0.5 else n
    steps, labels = [], []
    for k in range(n):
        right = k < first_wrong
        place = rng.choice(PLACES)
        steps.append(f"{name} is {activity} in the {place}. They {'agree' if right else 'differ'}.")
        labels.append(1.0 if right else 0.0)
    return {"problem": problem, "steps": steps, "labels": labels}


SYNTHETIC_SPLITS = {"train": (400, 11), "dev": (100, 12)}


def write_synthetic(out_dir: str | Path) -> list[Path]:
    """Write the synthetic train/dev split files into `out_dir` (atomically); a folder that cannot be written is a
    one-line UserError."""
    from app.atomic import write_atomic

    out_dir = Path(out_dir)
    written = []
    for split, (n, seed) in SYNTHETIC_SPLITS.items():
        rng = random.Random(seed)
        path = out_dir / f"{split}.jsonl"
        write_atomic(path, "".join(json.dumps(synthetic_example(rng)) + "\n" for _ in range(n)))
        written.append(path)
    return written


# --- conversion -----------------------------------------------------------------------------------------------
def convert(in_path: str | Path, out_path: str | Path, fmt: str = "auto") -> int:
    """Write the examples of `in_path` (any supported format) to `out_path` as generic JSONL; the number of rows
    written. The output is written atomically (a temporary file renamed into place), so an error leaves nothing
    behind; any problem is a one-line UserError."""
    from app.atomic import write_atomic

    in_path, out_path = Path(in_path), Path(out_path)
    if fmt != "auto" and fmt not in READERS:
        raise UserError(f"--format={fmt}: unknown step data format (known: auto, {', '.join(FORMATS)})")
    if out_path.is_dir():
        raise UserError(f"{out_path}: is a directory; give the output file (e.g. {out_path / 'steps.jsonl'})")
    if out_path.exists() and in_path.exists() and out_path.resolve() == in_path.resolve():
        raise UserError(f"{out_path}: the output is the input file; choose another path")
    rows = read_step_file(in_path, fmt, require_labels=False)
    text = "".join(json.dumps({k: r.values[k] for k in ("problem", "steps", "labels")}, ensure_ascii=False) + "\n"
                   for r in rows)
    parent = out_path.parent
    blocker = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise UserError(f"{out_path}: cannot create its folder, {blocker} is a file")
    write_atomic(out_path, text)  # a path that cannot be written is its one-line UserError
    return len(rows)


# --- command line ---------------------------------------------------------------------------------------------
USAGE = ("usage: python -m app.tasks.confidence_head.step_data synthetic DIR | "
         "convert INPUT OUTPUT.jsonl [--format=auto|generic|prm800k|reveal|eqasc|prmbench]")


def main(argv: list[str]) -> int:
    try:
        if len(argv) == 2 and argv[0] == "synthetic":
            for path in write_synthetic(argv[1]):
                print(f"wrote {path}")
            return 0
        if len(argv) in (3, 4) and argv[0] == "convert":
            fmt = "auto"
            if len(argv) == 4:
                if not argv[3].startswith("--format="):
                    raise UserError(USAGE)
                fmt = argv[3].split("=", 1)[1]
            n = convert(argv[1], argv[2], fmt)
            print(f"wrote {n} examples to {argv[2]}")
            return 0
        raise UserError(USAGE)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
