"""Synthetic confidence-token sample (data/sample/confidence/): `python -m app.tasks.confidence_tokens.sample DIR`."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from app.tasks.confidence_tokens.qa import QA, YES_NO, answer_text, parse_answer, raw_qa, wrong_answer


# --- synthetic sample -----------------------------------------------------------------------------------------------
# Places the simulated answerer knows: it answers these right and the others wrong, so whether an answer is correct
# follows from one word of the input (learnable by the tiny model in a few dozen steps).
KNOWN_PLACES = ("kitchen", "library", "office", "park", "garden", "forest")
WHERE_OPTIONS = ("indoors", "outdoors", "in the sea", "in the air", "under the ground")


def synthetic_raw(dataset: str, n: int, seed: int, claims=("indoors", "outdoors")) -> list[dict]:
    """Raw rows: BoolQ-like (question, passage, answer) or MedQA-like (question, options A-E, answer letter), each
    with `place` (the word the answer depends on). Gold answers follow app.tasks.sample_vocab.PLACES."""
    from app.tasks.sample_vocab import ACTIVITIES, NAMES, PLACES

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, activity, place = rng.choice(NAMES), rng.choice(ACTIVITIES), rng.choice(list(PLACES))
        if dataset == "medqa":
            options = list(WHERE_OPTIONS)
            rng.shuffle(options)
            letters = dict(zip("ABCDE", options))
            gold = next(k for k, v in letters.items() if v == PLACES[place])
            rows.append({"question": f"{name} is {activity} in the {place}. Where is {name}?", "options": letters,
                         "answer": gold, "place": place})
        else:
            claim = rng.choice(claims)
            rows.append({"question": f"is {name} {activity} {claim}", "passage": f"{name} is {activity} in the {place}.",
                         "answer": claim == PLACES[place], "place": place})
    return rows


def simulated_answer(qa: QA, place: str) -> str:
    """The simulated answerer: right for KNOWN_PLACES, wrong (indoors <-> outdoors) elsewhere."""
    right = place in KNOWN_PLACES
    if qa.kind == YES_NO:
        return answer_text(qa, qa.gold if right else wrong_answer(qa))
    if right:
        return qa.gold
    swap = {"indoors": "outdoors", "outdoors": "indoors"}[qa.options[qa.gold]]
    return next(k for k, v in qa.options.items() if v == swap)


def synthetic_tagged(n: int, seed: int, tokens: dict | None = None) -> list[dict]:
    """Training rows as `python -m app tag` writes them, from the simulated answerer, half BoolQ-like, half MedQA-like."""
    tokens = tokens or {"boolq": ("<C_READ>", "<U_READ>"), "medqa": ("<C_MED>", "<U_MED>")}
    out = []
    for dataset, raw in (("boolq", synthetic_raw("boolq", n // 2, seed)), ("medqa", synthetic_raw("medqa", n - n // 2, seed + 1))):
        for k, values in enumerate(raw):
            qa = raw_qa(values, dataset, "synthetic", k + 1)
            answer = simulated_answer(qa, values["place"])
            correct = parse_answer(qa, answer) == qa.gold
            out.append({"question": qa.text, "tagged_response": f"{answer} {tokens[dataset][0 if correct else 1]}",
                        "dataset": dataset})
    random.Random(seed).shuffle(out)
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_sample(out_dir: str | Path) -> None:
    """data/sample/confidence/: train.jsonl (tagged, 384 rows) and raw dev_boolq.jsonl / dev_medqa.jsonl (48 each)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "train.jsonl", synthetic_tagged(384, seed=11))
    for dataset, seed in (("boolq", 21), ("medqa", 22)):
        rows = [{k: v for k, v in r.items() if k != "place"} for r in synthetic_raw(dataset, 48, seed)]
        _write_jsonl(out / f"dev_{dataset}.jsonl", rows)


if __name__ == "__main__":
    write_sample(sys.argv[1] if len(sys.argv) > 1 else "data/sample/confidence")
