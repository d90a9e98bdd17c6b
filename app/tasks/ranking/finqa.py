"""FinQA records and the FinQA program language, executed exactly as the official FinQA evaluation does.

A program is a comma-separated list of steps `op(arg1, arg2)`; ops: add, subtract, multiply, divide, exp, greater
(-> "yes"/"no"), table_sum / table_average / table_max / table_min (arg1 names a table row, arg2 is "none"). An
argument is a number ("5.5", "1,200", "12%" = 0.12), a constant (`const_100`, `const_m1` = -1) or `#n`, the result of
step n. The result is rounded to 5 decimals (Python `round`); "yes"/"no" stay strings. A program the official code
rejects (an unknown op, a wrong structure, an unparseable number, a table row that does not exist or holds a non-number,
division by zero) is invalid: `execute` returns None.

Mirrors `program_tokenization`, `str_to_num`, `process_row` and `eval_program` of the FinQA code (czyssrs/FinQA,
code/evaluate/evaluate.py), quirks included: a table row is looked up by its first cell as written, the last row of a
name wins, and cells are cut at their first "(" after the "$" goes.

Records come in the original schema (`qa.question`, `qa.program`, `qa.exe_ans`) or as the flattened export
(`question`, `program`, `answer` at the top level, no `qa`), which `as_qa_form` maps to the original schema.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from app.errors import UserError

ALL_OPS = ("add", "subtract", "multiply", "divide", "exp", "greater", "table_max", "table_min", "table_sum",
           "table_average")
ARITHMETIC = ALL_OPS[:6]
NA = "n/a"


# --- the official executor ----------------------------------------------------------------------------------------
def program_tokenization(original_program: str) -> list[str]:
    """The program as FinQA's token list: ["divide(", "114400", "329500", ")", ..., "EOF"]."""
    program = []
    for tok in original_program.split(", "):
        cur_tok = ""
        for c in tok:
            if c == ")":
                if cur_tok != "":
                    program.append(cur_tok)
                    cur_tok = ""
            cur_tok += c
            if c in ("(", ")"):
                program.append(cur_tok)
                cur_tok = ""
        if cur_tok != "":
            program.append(cur_tok)
    program.append("EOF")
    return program


def str_to_num(text: str):
    """A number of a program argument or table cell; "n/a" when it is none."""
    text = text.replace(",", "")
    try:
        return float(text)
    except ValueError:
        if "%" in text:
            text = text.replace("%", "")
            try:
                return float(text) / 100.0
            except ValueError:
                return NA
        if "const" in text:
            text = text.replace("const_", "")
            if text == "m1":
                text = "-1"
            return float(text)  # an unparseable constant raises: the program is invalid
        return NA


def process_row(row_in: list[str]):
    row_out = []
    for num in row_in:
        num = num.replace("$", "").strip()
        num = num.split("(")[0].strip()
        num = str_to_num(num)
        if num == NA:
            return NA
        row_out.append(num)
    return row_out


def eval_program(program: list[str], table: list[list[str]]):
    """(invalid_flag, result) of a tokenized program (with its trailing "EOF"), as the official code returns it."""
    invalid_flag = 0
    this_res = NA
    num_row = NA
    try:
        program = program[:-1]  # remove EOF
        for ind, token in enumerate(program):
            if ind % 4 == 0 and token.strip("(") not in ALL_OPS:
                return 1, NA
            if (ind + 1) % 4 == 0 and token != ")":
                return 1, NA
        program = "|".join(program)
        steps = program.split(")")[:-1]
        res_dict = {}
        for ind, step in enumerate(steps):
            step = step.strip()
            if len(step.split("(")) > 2:
                invalid_flag = 1
                break
            op = step.split("(")[0].strip("|").strip()
            args = step.split("(")[1].strip("|").strip()
            arg1 = args.split("|")[0].strip()
            arg2 = args.split("|")[1].strip()
            if op in ARITHMETIC:
                if "#" in arg1:
                    arg1 = res_dict[int(arg1.replace("#", ""))]
                else:
                    arg1 = str_to_num(arg1)
                    if arg1 == NA:
                        invalid_flag = 1
                        break
                if "#" in arg2:
                    arg2 = res_dict[int(arg2.replace("#", ""))]
                else:
                    arg2 = str_to_num(arg2)
                    if arg2 == NA:
                        invalid_flag = 1
                        break
                if op == "add":
                    this_res = arg1 + arg2
                elif op == "subtract":
                    this_res = arg1 - arg2
                elif op == "multiply":
                    this_res = arg1 * arg2
                elif op == "divide":
                    this_res = arg1 / arg2
                elif op == "exp":
                    this_res = arg1 ** arg2
                elif op == "greater":
                    this_res = "yes" if arg1 > arg2 else "no"
                res_dict[ind] = this_res
            elif "table" in op:
                table_dict = {}
                for row in table:
                    table_dict[row[0]] = row[1:]
                if "#" in arg1:
                    arg1 = res_dict[int(arg1.replace("#", ""))]
                else:
                    if arg1 not in table_dict:
                        invalid_flag = 1
                        break
                    cal_row = table_dict[arg1]
                    num_row = process_row(cal_row)
                if num_row == NA:
                    invalid_flag = 1
                    break
                if op == "table_max":
                    this_res = max(num_row)
                elif op == "table_min":
                    this_res = min(num_row)
                elif op == "table_sum":
                    this_res = sum(num_row)
                elif op == "table_average":
                    this_res = sum(num_row) / len(num_row)
                res_dict[ind] = this_res
        if this_res != "yes" and this_res != "no" and this_res != NA:
            this_res = round(this_res, 5)
    except Exception:  # the official code's bare except: any failure is an invalid program
        invalid_flag = 1
    return invalid_flag, this_res


def execute(program: str, table: list[list[str]] | None = None):
    """The value of a program string (float rounded to 5 decimals, or "yes"/"no"); None when invalid."""
    if not isinstance(program, str) or not program.strip():
        return None
    invalid, res = eval_program(program_tokenization(program), table or [])
    if invalid or res == NA or (isinstance(res, float) and not math.isfinite(res)):
        return None
    return res


def same_answer(a, b) -> bool:
    """FinQA's execution match: equal after rounding to 5 decimals (floats), or the same "yes"/"no"."""
    if a is None or b is None:
        return False
    if isinstance(a, str) or isinstance(b, str):
        return str(a).strip().lower() == str(b).strip().lower()
    return round(float(a), 5) == round(float(b), 5)


def format_answer(value) -> str:
    """How an answer value is written in a candidate: yes/no, or the number with up to 5 decimals."""
    if isinstance(value, str):
        return value
    text = f"{round(float(value), 5):.5f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def program_numbers(program: str) -> list[str]:
    """The literal number arguments of a program (no constants, step references or row names)."""
    out = []
    for tok in program_tokenization(program)[:-1]:
        t = tok.strip()
        if t.endswith("(") or t == ")" or t.startswith("#") or t.startswith("const_") or t == "none":
            continue
        if str_to_num(t) != NA:
            out.append(t)
    return out


# --- records ------------------------------------------------------------------------------------------------------
def linearise_table(table: list[list[str]]) -> str:
    """One line per row: `first cell : cell ; cell ; ...` (header row included)."""
    lines = []
    for row in table:
        cells = [str(c).strip() for c in row]
        lines.append(f"{cells[0]} : " + " ; ".join(cells[1:]) if len(cells) > 1 else cells[0])
    return "\n".join(lines)


def context_text(record: dict, mode: str) -> str:
    """The context a question is read with: `full` (pre_text, the table row by row, post_text) or `gold` (the
    annotated supporting facts only, `qa.gold_inds`, in their order)."""
    if mode == "gold":
        gold = record["qa"].get("gold_inds") or {}
        return "\n".join(str(v) for v in gold.values())
    pre = " ".join(str(s) for s in record.get("pre_text", []))
    post = " ".join(str(s) for s in record.get("post_text", []))
    return "\n".join(p for p in (pre, linearise_table(record.get("table", [])), post) if p)


def _written_number(text: str) -> tuple[float, float, bool] | None:
    """(value, half a unit of its last written digit, written as a percentage) of an answer as FinQA writes one
    ("34.7%", "1,200", "$ 5", "-2.4"); None when it is not a number."""
    text = text.replace("$", "").replace(",", "").strip()
    percent = text.endswith("%")
    digits = text[:-1].strip() if percent else text
    try:
        value = float(digits)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    decimals = len(digits.split(".")[1]) if "." in digits else 0
    return value, 0.5 * 10.0 ** -decimals, percent


def flattened_exe_ans(answer, program: str, table: list):
    """`qa.exe_ans` of a flattened record: its `answer` when that is a number or yes/no; for an answer written as
    text ("34.7%", "8,953"), the gold program's result when the text is that result as written (rounded, a
    percentage as a fraction or as is), as FinQA's exe_ans holds it, else the number written (a percentage as a
    fraction). None when the answer is neither."""
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return float(answer) if math.isfinite(answer) else None
    if not isinstance(answer, str):
        return None
    if answer.strip().lower() in ("yes", "no"):
        return answer.strip().lower()
    written = _written_number(answer)
    if written is None:
        return None
    value, half_unit, percent = written
    result = execute(program, table)
    readings = [(value / 100, half_unit / 100), (value, half_unit)] if percent else [(value, half_unit)]
    if isinstance(result, float) and any(abs(result - v) <= h * (1 + 1e-9) for v, h in readings):
        return result
    return readings[0][0]


FLATTENED_KEYS = ("question", "program", "answer")


def is_flattened(record) -> bool:
    """A record of the flattened export: {id, question, pre_text, post_text, table, answer, program}, no `qa`."""
    return isinstance(record, dict) and "qa" not in record and any(k in record for k in FLATTENED_KEYS)


def flattened_problem(record: dict) -> str | None:
    """Why a flattened record cannot be read as the original schema (None when it can)."""
    missing = [k for k in FLATTENED_KEYS if k not in record]
    if missing:
        return (f"missing {', '.join(repr(k) for k in missing)} (a record without 'qa' needs question, program and "
                "answer)")
    if not isinstance(record["program"], str):
        return "'program' must be a string"
    if flattened_exe_ans(record["answer"], record["program"], record.get("table") or []) is None:
        return f"'answer' {_clip(record['answer'])} is not a number or yes/no"
    return None


def _clip(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def as_qa_form(record: dict) -> dict:
    """A readable flattened record in the original schema: `qa` = {question, program, exe_ans (from answer),
    gold_inds when the record has them}; its other fields as they are."""
    qa = {"question": record["question"], "program": record["program"],
          "exe_ans": flattened_exe_ans(record["answer"], record["program"], record.get("table") or [])}
    if "gold_inds" in record:
        qa["gold_inds"] = record["gold_inds"]
    return {**{k: v for k, v in record.items() if k not in (*FLATTENED_KEYS, "gold_inds")}, "qa": qa}


def check_record(record, where: str, field: str = "qa.{}") -> str | None:
    """Why a FinQA record (original schema or flattened) cannot be used (None when it can)."""
    if not isinstance(record, dict):
        return f"a record must be a JSON object, found {type(record).__name__}"
    if is_flattened(record):
        return flattened_problem(record) or check_record(as_qa_form(record), where, field="{}")
    qa = record.get("qa")
    if not isinstance(qa, dict):
        return "missing 'qa' (or, flattened, 'question', 'program' and 'answer')"
    for key in ("question", "program", "exe_ans"):
        if key not in qa:
            return f"missing '{field.format(key)}'"
    if not isinstance(qa["question"], str) or not qa["question"].strip():
        return f"'{field.format('question')}' must be a non-empty string"
    if not isinstance(qa["program"], str):
        return f"'{field.format('program')}' must be a string"
    table = record.get("table", [])
    if not isinstance(table, list) or not all(isinstance(r, list) and r and all(isinstance(c, str) for c in r)
                                              for r in table):
        return "'table' must be a list of non-empty rows of strings"
    if table:
        width = len(table[0])
        bad = next((k for k, r in enumerate(table) if len(r) != width), None)
        if bad is not None:
            return f"table row {bad} has {len(table[bad])} cells, the header has {width}"
    for key in ("pre_text", "post_text"):
        if not isinstance(record.get(key, []), list):
            return f"'{key}' must be a list of strings"
    tokens = program_tokenization(qa["program"])[:-1]
    if not tokens or len(tokens) % 4 or any(tokens[i].strip("(") not in ALL_OPS for i in range(0, len(tokens), 4)):
        return f"{field.format('program')} {qa['program'][:80]!r} does not parse"
    return None


def read_finqa(path: str | Path) -> list[dict]:
    """The records of a FinQA file: a JSON array (the original release) or JSON lines."""
    from app.data import read_text

    path = Path(path)
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as err:
            raise UserError(f"{path}: not valid JSON ({str(err).splitlines()[0]})") from None
        return data
    from app.data import read_rows

    return [r.values for r in read_rows(path)]


def prepare_records(path: str | Path, context: str = "full", bad_records: str = "error") -> tuple[list[dict], dict]:
    """(rows, stats): one row per question (id, question, context, gold program and answer, table), and counts.

    A bad record is a UserError naming the file and record, or with bad_records='skip' counted and left out."""
    path = Path(path)
    records = read_finqa(path)
    rows, skipped, executed, problems = [], 0, 0, []
    for k, rec in enumerate(records):
        why = check_record(rec, f"{path}")
        name = rec.get("id", k) if isinstance(rec, dict) else k
        if why is not None:
            if bad_records == "error":
                raise UserError(f"{path}: record {k} ({name}): {why}")
            skipped += 1
            problems.append(f"record {k} ({name}): {why}")
            continue
        if is_flattened(rec):
            rec = as_qa_form(rec)
        qa = rec["qa"]
        table = rec.get("table", [])
        value = execute(qa["program"], table)
        ok = same_answer(value, qa["exe_ans"])
        executed += ok
        if not ok:
            problems.append(f"record {k} ({name}): program gives {value!r}, exe_ans is {qa['exe_ans']!r}")
        rows.append({"id": str(rec.get("id", k)), "question": qa["question"].strip(),
                     "context": context_text(rec, context), "gold_program": qa["program"],
                     "gold_answer": qa["exe_ans"], "table": table, "record": k})
    stats = {"records": len(records), "questions": len(rows), "skipped": skipped, "gold_executed": executed,
             "gold_programs": len(rows), "problems": problems}
    return rows, stats
