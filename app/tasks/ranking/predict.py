"""`python -m app ranking rank INPUT.jsonl [--checkpoint DIR] [--output FILE] [--fresh] [--key=value ...]` (and
`python -m app infer` on a ranking checkpoint): pick the best candidate of every question.

Input: JSONL rows with `question`, `context` and `candidates` (as `ranking candidates` or `ranking rewards` writes
them); `rewards` (and `exact`) optional: with them the metrics are computed, and with `gold_answer` but no rewards the
rewards are computed from the candidates' answers (`reward_tiers`).

Outputs, for `--output DIR/NAME.jsonl` (default `rankings.jsonl`):
  DIR/NAME.jsonl               one line per question, in input order: {"index", "line", "id", "pick", "pick_text",
                               "scores": [one per candidate], and with rewards "reward", "best_reward", "exact"}
  DIR/NAME.metrics.json        counts, and with rewards the ranking metrics with the random and oracle baselines
  DIR/NAME.jsonl.partial.jsonl finished batches (fsynced), so a re-run after a kill continues; removed at the end
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from app.atomic import write_atomic, write_json_atomic
from app.data import read_rows
from app.lm.modeling import load_for_inference
from app.runs import JsonlOutputs
from app.tasks.ranking.features import check_row, feature_of, score_features
from app.tasks.ranking.finqa import same_answer
from app.tasks.ranking.metrics import ranking_metrics, table
from app.tasks.ranking.model import build_objective, load_head
from app.tasks.ranking.rewards import reward

DEFAULT_OUTPUT = "rankings.jsonl"


def load_ranker(ckpt: Path, cfg, device):
    """(objective in eval mode, tokenizer) from a ranking checkpoint."""
    model, tokenizer = load_for_inference(ckpt, cfg, device)
    objective = build_objective(model, cfg, tokenizer.pad_token_id)
    load_head(objective.head, ckpt)
    objective.eval()
    return objective, tokenizer


class Ranker:
    """What `ranking rank` (and `infer`) run for a ranking checkpoint (app.tasks.protocol.Predictor)."""

    default_output = DEFAULT_OUTPUT
    verb = "rank"

    def fingerprint_parts(self, cfg) -> dict:
        return {}

    def read_input(self, path: Path, cfg):
        rows = read_rows(path)
        self.source = str(path)
        for r in rows:
            check_row(r.values, f"{path}:{r.line}", require_rewards=False)
            v = r.values
            if v.get("rewards") is None and "gold_answer" in v:
                v["rewards"] = [reward(c.get("answer"), v["gold_answer"], cfg.reward_tiers) for c in v["candidates"]]
                v["exact"] = [same_answer(c.get("answer"), v["gold_answer"]) for c in v["candidates"]]
        return rows

    def output_paths(self, output: Path) -> JsonlOutputs:
        return JsonlOutputs(output, DEFAULT_OUTPUT, "rankings")

    def load(self, checkpoint: Path, cfg, device):
        return load_ranker(checkpoint, cfg, device)

    def predict(self, state, cfg, rows, device, skip):
        objective, tokenizer = state
        features = [feature_of(r.values, tokenizer, cfg, r.line, f"{getattr(self, 'source', 'input')}:{r.line}", overlength="truncate")
                    for r in rows]
        for batch, scores in score_features(objective, features, tokenizer.pad_token_id, device,
                                            cfg.infer_batch_size, skip=skip):
            yield [{"i": i, "scores": s} for i, s in zip(batch, scores)]

    def finish(self, rows, records: list[dict], paths: JsonlOutputs, summary: dict, examples: int) -> dict:
        lines, labelled = [], [r for r in rows if r.values.get("rewards") is not None]
        for i, (row, rec) in enumerate(zip(rows, records)):
            v, scores = row.values, rec["scores"]
            pick = max(range(len(scores)), key=lambda k: (scores[k], -k))
            out = {"index": i, "line": row.line, **({"id": v["id"]} if "id" in v else {}), "pick": pick,
                   "pick_text": v["candidates"][pick]["text"], "scores": scores}
            if v.get("rewards") is not None:
                out.update(reward=v["rewards"][pick], best_reward=max(v["rewards"]))
                if v.get("exact") is not None:
                    out["exact"] = bool(v["exact"][pick])
            lines.append(json.dumps(out, ensure_ascii=False) + "\n")
        summary["candidates"] = sum(len(r.values["candidates"]) for r in rows)
        summary["labelled_questions"] = len(labelled)
        if len(labelled) == len(rows):
            metrics = ranking_metrics([rec["scores"] for rec in records], [r.values["rewards"] for r in rows],
                                      [r.values.get("exact") or [x >= 1.0 for x in r.values["rewards"]] for r in rows])
            summary["metrics"] = metrics
        write_atomic(paths.main, "".join(lines))
        write_json_atomic(paths.metrics, summary)
        print(f"{len(rows)} questions ranked ({summary['candidates']} candidates)")
        if "metrics" in summary:
            print(table(summary["metrics"]))
        print(f"wrote {paths.main}, {paths.metrics}", file=sys.stderr)
        return summary
