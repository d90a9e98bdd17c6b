"""The bundled synthetic ranking set (data/sample/ranking/): small enough for the tiny model to learn on a CPU.

Each question asks for a place that is indoors (or outdoors); the context tells who does what where (words of the
shared sample vocabulary, so the tiny tokenizer knows them). The 8 candidates are one place of the asked kind
(reward 1), six of the other kind (reward 0) and an activity (reward 0), shuffled. Rows are in the format
`python -m app ranking rewards` writes, so training and `rank` read them unchanged. Deterministic.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from app.tasks.sample_vocab import ACTIVITIES, NAMES, PLACES

SPLITS = {"train": (320, 11), "dev": (64, 12)}


def synthetic_question(rng: random.Random, k: int) -> dict:
    kind = rng.choice(["indoors", "outdoors"])
    right = [p for p, w in PLACES.items() if w == kind]
    wrong = [p for p, w in PLACES.items() if w != kind]
    people = rng.sample(NAMES, 3)
    context = " ".join(f"{n} is {rng.choice(ACTIVITIES)} in the {rng.choice(list(PLACES))}." for n in people)
    answer = rng.choice(right)
    pool = [(answer, 1.0)] + [(p, 0.0) for p in rng.sample(wrong, 6)] + [(rng.choice(ACTIVITIES), 0.0)]
    rng.shuffle(pool)
    return {"id": f"synthetic-{k}", "question": f"Which place is {kind}?", "context": context,
            "candidates": [{"text": f"the {t}", "answer": t, "program": None, "kind": "gold" if r else "wrong"}
                           for t, r in pool],
            "rewards": [r for _, r in pool], "exact": [r == 1.0 for _, r in pool], "gold_answer": answer}


def write_sample(out_dir: str | Path) -> list[Path]:
    """Write train.jsonl and dev.jsonl into `out_dir` (atomically)."""
    from app.atomic import write_atomic

    out_dir = Path(out_dir)
    written = []
    for split, (n, seed) in SPLITS.items():
        rng = random.Random(seed)
        path = out_dir / f"{split}.jsonl"
        write_atomic(path, "".join(json.dumps(synthetic_question(rng, k)) + "\n" for k in range(n)))
        written.append(path)
    return written
