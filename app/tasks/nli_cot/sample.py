"""The bundled NLI sample set (data/sample/).

Premises place a person in a room or outdoors; hypotheses claim the person is indoors or outdoors.
The label follows from one fact per place, so a tiny model can learn it on a CPU in a minute, and the
thought process spells out the reasoning so chain-of-thought training has something to imitate.

Regenerate with `python -m app sample-data nli_cot data/sample` (deterministic).
"""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

from app.tasks.sample_vocab import ACTIVITIES, NAMES, PLACES
PREMISES = ["{name} is {activity} in the {place}.", "In the {place}, {name} is {activity}."]
HYPOTHESES = ["{name} is {claim}.", "{name} is {activity} {claim}."]


def make_row(rng: random.Random) -> dict:
    name, activity, place = rng.choice(NAMES), rng.choice(ACTIVITIES), rng.choice(list(PLACES))
    where = PLACES[place]
    claim = rng.choice(["indoors", "outdoors"])
    label = int(claim == where)
    premise = rng.choice(PREMISES).format(name=name, activity=activity, place=place)
    hypothesis = rng.choice(HYPOTHESES).format(name=name, activity=activity, claim=claim)
    verdict = "They agree." if label else "They differ."
    thought = f"The {place} is {where}. The hypothesis says {claim}. {verdict}"
    return {"premise": premise, "hypothesis": hypothesis, "label": label, "thought_process": thought}


def make_split(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [make_row(rng) for _ in range(n)]


SPLITS = {"train": (800, 1), "dev": (200, 2), "test": (200, 3)}


def write_sample(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, (n, seed) in SPLITS.items():
        with open(out_dir / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["premise", "hypothesis", "label", "thought_process"])
            writer.writeheader()
            writer.writerows(make_split(n, seed))


if __name__ == "__main__":
    write_sample(Path(sys.argv[1] if len(sys.argv) > 1 else "data/sample"))
