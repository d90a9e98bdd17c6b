"""The FinQA data pipeline behind `python -m app ranking prepare|candidates|rewards`.

Each step reads one file and writes OUTPUT (JSON lines) and OUTPUT's stats file (`<stem>.stats.json`: counts and the
fingerprint of the input bytes, the step and its settings), both atomically, the stats last: a killed step leaves the
old files or none, and a re-run with the same input and settings is "up to date" and does nothing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from app.atomic import write_atomic, write_json_atomic
from app.errors import UserError

SETTINGS = {
    "prepare": ("rank_context", "rank_bad_records"),
    "candidates": ("seed", "num_candidates", "corruption_rate", "corruption_mix", "numeric_perturbation",
                   "candidate_text"),
    "rewards": ("reward_tiers",),
}
ROOT = Path(__file__).resolve().parents[3]


def stats_path(output: Path) -> Path:
    stem = output.with_suffix("") if output.suffix else output
    return stem.with_name(stem.name + ".stats.json")


def load_settings(config_file: str, overrides):
    from app.config import load_config

    path = Path(config_file)
    if not path.is_file() and not path.is_absolute() and (ROOT / path).is_file():
        path = ROOT / path  # the default config, from another working directory
    cfg = load_config(path, list(overrides))
    if cfg.task != "ranking":
        raise UserError(f"{config_file}: task={cfg.task!r}; the ranking commands need a ranking config "
                        "(e.g. configs/ranking.py)")
    return cfg


def read_jsonl(path: Path, required: tuple[str, ...], step: str) -> list[dict]:
    from app.data import read_rows

    rows = read_rows(path)
    hint = {"candidates": "ranking prepare", "rewards": "ranking candidates"}[step]
    if not rows:
        raise UserError(f"{path}: no rows (write this file with python -m app {hint})")
    out = []
    for r in rows:
        missing = [k for k in required if k not in r.values]
        if missing:
            raise UserError(f"{path}:{r.line}: missing {', '.join(missing)} (write this file with python -m app {hint})")
        out.append(r.values)
    ids = {}
    for r, v in zip(rows, out):
        key = str(v["id"])
        if key in ids:
            raise UserError(f"{path}:{r.line}: duplicate id {key!r} (first on line {ids[key]})")
        ids[key] = r.line
    return out


def _check_candidates(path: Path, rows: list[dict]) -> None:
    for k, v in enumerate(rows):
        cands = v["candidates"]
        if not isinstance(cands, list) or not cands or not all(isinstance(c, dict) and "answer" in c for c in cands):
            raise UserError(f"{path}: row {k} ({v.get('id')}): 'candidates' must be a list of objects with an 'answer'")


def run_step(step: str, input_file, output, config_file: str, overrides=(), fresh: bool = False) -> int:
    from app.runs import check_output, refuse_side_file_on_input

    cfg = load_settings(config_file, overrides)
    input_path, output = Path(input_file), Path(output)
    from app.data import read_text

    data = read_text(input_path).encode("utf-8")  # missing, empty, undecodable: one line, before anything else
    check_output(output, input_path)
    stats_file = stats_path(output)
    refuse_side_file_on_input(stats_file, "stats", output, input_path)
    settings = {k: getattr(cfg, k) for k in SETTINGS[step]}
    fp = hashlib.sha256(hashlib.sha256(data).digest() + json.dumps([step, settings], sort_keys=True,
                                                                    default=str).encode()).hexdigest()
    if not fresh and output.is_file() and stats_file.is_file():
        try:
            old = json.loads(stats_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        if old.get("fingerprint") == fp and old.get("output_sha256") == hashlib.sha256(output.read_bytes()).hexdigest():
            print(f"{output}: up to date (same input and settings); --fresh recomputes it")
            if step == "prepare":
                print(f"gold programs: {old['gold_executed']}/{old['gold_programs']} execute to exe_ans")
            return 0

    if step == "prepare":
        from app.tasks.ranking.finqa import prepare_records

        rows, stats = prepare_records(input_path, cfg.rank_context, cfg.rank_bad_records)
        if not rows:
            why = (f"all {stats['skipped']} records are bad (rank_bad_records='skip')" if stats["skipped"]
                   else "no FinQA records")
            raise UserError(f"{input_path}: {why}; nothing to prepare")
        print(f"gold programs: {stats['gold_executed']}/{stats['gold_programs']} execute to exe_ans")
        if stats["skipped"]:
            print(f"skipped {stats['skipped']} bad records (rank_bad_records='skip')")
        for line in stats["problems"][:10]:
            print(f"  {line}")
    elif step == "candidates":
        from app.tasks.ranking.candidates import add_candidates

        rows = add_candidates(read_jsonl(input_path, ("id", "question", "context", "gold_program", "gold_answer"),
                                         step), cfg)
        kinds: dict[str, int] = {}
        for r in rows:
            for c in r["candidates"]:
                kinds[c["kind"]] = kinds.get(c["kind"], 0) + 1
        stats = {"questions": len(rows), "candidates": sum(len(r["candidates"]) for r in rows), "kinds": kinds}
        print(f"{stats['candidates']} candidates for {len(rows)} questions: "
              + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    else:
        from app.tasks.ranking.rewards import add_rewards

        loaded = read_jsonl(input_path, ("id", "question", "context", "candidates", "gold_answer"), step)
        _check_candidates(input_path, loaded)
        rows = add_rewards(loaded, cfg)
        best = [max(r["rewards"]) for r in rows]
        stats = {"questions": len(rows), "mean_reward": sum(sum(r["rewards"]) / len(r["rewards"]) for r in rows)
                 / len(rows), "questions_with_exact": sum(any(r["exact"]) for r in rows),
                 "mean_best_reward": sum(best) / len(best)}
        print(f"{len(rows)} questions: mean reward {stats['mean_reward']:.4f}, "
              f"{stats['questions_with_exact']} with an exact candidate")
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    write_atomic(output, text)
    write_json_atomic(stats_file, {**stats, "step": step, "input": str(input_path), "settings": settings,
                                   "fingerprint": fp,
                                   "output_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()})
    print(f"wrote {output} ({len(rows)} rows), {stats_file}")
    return 0
