"""Candidate pools: the gold answer plus deterministic corruptions of its program, shuffled.

Every candidate is `{"text", "answer", "program", "kind"}`; `answer` is what its program executes to (None for an
unparseable one), `kind` is "gold", "restated" (the gold answer by another program) or the corruption kind:

  numeric         one number of the program changed by up to `numeric_perturbation` (relative), re-executed
  operation       one operation replaced by another of its family (add/subtract/multiply/divide, table_*; greater
                  with its arguments swapped), re-executed
  argument        one number of the program replaced by another number of the question's context, re-executed
  sign            the result negated (multiply(#n, const_m1))
  scale           percent vs fraction, thousands vs millions: the result multiplied or divided by 100 or 1000
  other_question  the program and answer of another question of the file
  unparseable     the program cut off: it does not execute and has no answer

Draws are seeded by `seed` and the question's id, so a question gets the same pool whatever the file around it
(`other_question` draws from the file's other questions). Candidate texts are distinct where the pool allows it.
"""

from __future__ import annotations

import random
import re

from app.tasks.ranking.finqa import execute, format_answer, program_numbers, program_tokenization

FAMILIES = [("add", "subtract", "multiply", "divide"), ("table_sum", "table_average", "table_max", "table_min")]
_NUMBER = re.compile(r"(?<![\w.#])-?\d+(?:,\d{3})*(?:\.\d+)?%?(?![\w.])")


def steps_of(program: str) -> int:
    return max(1, (len(program_tokenization(program)) - 1) // 4)


def candidate_text(program: str | None, answer, mode: str) -> str:
    shown = "n/a" if answer is None else format_answer(answer)
    if mode == "answer" or program is None:
        return shown
    return f"{program} = {shown}"


def _replace_literal(program: str, old: str, new: str, rng: random.Random) -> str | None:
    """The program with one occurrence (chosen by rng) of the literal argument `old` replaced."""
    parts = re.split(r"(\(|, |\))", program)
    spots = [i for i, p in enumerate(parts) if p.strip() == old]
    if not spots:
        return None
    parts[rng.choice(spots)] = new
    return "".join(parts)


def _numeric(row, rng, cfg, others):
    nums = program_numbers(row["gold_program"])
    if not nums:
        return None
    old = rng.choice(nums)
    value = float(old.replace(",", "").rstrip("%"))
    delta = rng.uniform(0.01, cfg.numeric_perturbation) * rng.choice((-1, 1))
    new = format_answer(value * (1 + delta) if value else delta)
    return _replace_literal(row["gold_program"], old, new + ("%" if old.endswith("%") else ""), rng)


def _operation(row, rng, cfg, others):
    tokens = program_tokenization(row["gold_program"])[:-1]
    heads = [i for i in range(0, len(tokens), 4)]
    rng.shuffle(heads)
    for i in heads:
        op = tokens[i].rstrip("(")
        if op == "greater":
            steps = [tokens[j : j + 4] for j in range(0, len(tokens), 4)]
            k = i // 4
            steps[k] = [steps[k][0], steps[k][2], steps[k][1], steps[k][3]]
            return ", ".join(f"{s[0]}{s[1]}, {s[2]}{s[3]}" for s in steps)
        for family in FAMILIES:
            if op in family:
                new = rng.choice([o for o in family if o != op])
                steps = [tokens[j : j + 4] for j in range(0, len(tokens), 4)]
                steps[i // 4][0] = new + "("
                return ", ".join(f"{s[0]}{s[1]}, {s[2]}{s[3]}" for s in steps)
    return None


def _argument(row, rng, cfg, others):
    nums = program_numbers(row["gold_program"])
    pool = sorted({m.group(0) for m in _NUMBER.finditer(row.get("context", ""))} - set(nums))
    if not nums or not pool:
        return None
    return _replace_literal(row["gold_program"], rng.choice(nums), rng.choice(pool), rng)


def _sign(row, rng, cfg, others):
    n = steps_of(row["gold_program"])
    return f"{row['gold_program']}, multiply(#{n - 1}, const_m1)"


def _scale(row, rng, cfg, others):
    n = steps_of(row["gold_program"])
    op, const = rng.choice([("multiply", "const_100"), ("divide", "const_100"), ("multiply", "const_1000"),
                            ("divide", "const_1000")])
    return f"{row['gold_program']}, {op}(#{n - 1}, {const})"


KINDS = {"numeric": _numeric, "operation": _operation, "argument": _argument, "sign": _sign, "scale": _scale}


def _restated(row, rng):
    tokens = program_tokenization(row["gold_program"])[:-1]
    if len(tokens) == 4 and tokens[0] in ("add(", "multiply("):
        return f"{tokens[0]}{tokens[2]}, {tokens[1]}{tokens[3]}"
    return f"{row['gold_program']}, multiply(#{steps_of(row['gold_program']) - 1}, const_1)"


def make_candidates(row: dict, others: list[dict], cfg) -> list[dict]:
    """The shuffled pool of `cfg.num_candidates` candidates of one prepared row."""
    rng = random.Random(f"{cfg.seed}:{row['id']}")
    table = row.get("table") or []
    gold_answer = execute(row["gold_program"], table)
    if gold_answer is None:
        gold_answer = row["gold_answer"]
    mode = cfg.candidate_text
    pool = [{"text": candidate_text(row["gold_program"], gold_answer, mode), "answer": gold_answer,
             "program": row["gold_program"], "kind": "gold"}]
    seen = {pool[0]["text"]}

    def add(program, answer, kind) -> bool:
        text = candidate_text(program, answer, mode)
        if text in seen:
            return False
        seen.add(text)
        pool.append({"text": text, "answer": answer, "program": program, "kind": kind})
        return True

    slots = cfg.num_candidates - 1
    n_restated = sum(rng.random() >= cfg.corruption_rate for _ in range(slots))
    for _ in range(n_restated):
        add(_restated(row, rng) if len(pool) == 1 else f"{_restated(row, rng)}, add(#{steps_of(row['gold_program'])}, const_0)",
            gold_answer, "restated")
    kinds = [k for k, w in cfg.corruption_mix.items() if w > 0]
    weights = [cfg.corruption_mix[k] for k in kinds]
    others = [o for o in others if o["id"] != row["id"]]
    attempts = 0
    while len(pool) < cfg.num_candidates and attempts < 200 and kinds:
        attempts += 1
        kind = rng.choices(kinds, weights)[0]
        if kind == "other_question":
            if not others:
                continue
            other = rng.choice(others)
            answer = execute(other["gold_program"], other.get("table") or [])
            if answer is not None:
                add(other["gold_program"], answer, kind)
            continue
        if kind == "unparseable":
            prog = row["gold_program"]
            cut = rng.randint(max(1, len(prog) // 3), max(1, len(prog) - 1))
            add(prog[:cut], None, kind)
            continue
        program = KINDS[kind](row, rng, cfg, others)
        if program is None:
            continue
        answer = execute(program, table)
        if answer is None:
            continue
        add(program, answer, kind)
    k = 0
    while len(pool) < cfg.num_candidates:  # a pool the corruptions could not fill: perturbed answers, then repeats
        k += 1
        if isinstance(gold_answer, float) and k < 100:
            add(None, round(gold_answer * (1 + rng.uniform(-0.5, 0.5)) + rng.choice((-1, 1)) * k, 5), "numeric")
        elif k < 100:
            add(None, "no" if gold_answer == "yes" else "yes", "operation") or add(None, None, "unparseable")
            if len(pool) < cfg.num_candidates and k > 2:
                pool.append(dict(pool[-1]))
        else:
            pool.append(dict(pool[-1]))
    rng.shuffle(pool)
    return pool


def add_candidates(rows: list[dict], cfg) -> list[dict]:
    return [{**row, "candidates": make_candidates(row, rows, cfg)} for row in rows]
