"""`python -m app score-steps INPUT.jsonl [--checkpoint DIR] [--output FILE] [--fresh] [--key=value ...]`.

Per-step confidences from a trained `confidence_head` checkpoint for step-by-step solutions in the generic step
JSONL (`{"problem": ..., "steps": [...], "labels": [...]}`, labels optional, an `id` is copied; other formats convert
with `python -m app.tasks.confidence_head.step_data convert`).

Checkpoint and config: as every checkpoint command (app/runs.py) (a checkpoint or run directory, else the newest run under
checkpoints/; the checkpoint's run_config.json, then `--key=value` overrides such as `--infer_batch_size=8`).

Outputs, for `--output DIR/NAME.jsonl` (default `step_scores.jsonl`):
  DIR/NAME.jsonl               one line per input record, in input order (blank input lines are skipped):
                               {"index": i, "line": input line, "id": ..., "scores": [one confidence per step]};
                               a step cut off by max_seq_length has a null score
  DIR/NAME.metrics.json        counts, and when the input has labels: MSE, MAE, Pearson, Spearman, AUROC (label >= 0.5
                               is a correct step), ECE and the full calibration report, over the labelled steps
  DIR/NAME.jsonl.partial.jsonl finished batches (fsynced), so a re-run continues; removed at the end
Final files are written to a temporary file and renamed into place. `python -m app infer` on a
confidence_head checkpoint runs the same. Batches are length-sorted (`infer_batch_size`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from app.atomic import write_atomic, write_json_atomic
from app.errors import UserError
from app.lm.modeling import load_for_inference
from app.metrics.calibration import calibration_report
from app.runs import JsonlOutputs, run_predictor
from app.tasks.confidence_head.metrics import labelled_pairs, step_metrics
from app.tasks.confidence_head.model import build_objective, encode_steps, load_head, score_features
from app.tasks.confidence_head.step_data import detect_format, read_records, read_step_file

DEFAULT_OUTPUT = "step_scores.jsonl"


def load_scorer(ckpt: Path, cfg, device):
    """(objective in eval mode, tokenizer) from a confidence_head checkpoint."""
    model, tokenizer = load_for_inference(ckpt, cfg, device)
    objective = build_objective(model, cfg)
    load_head(objective.head, ckpt)
    objective.eval()
    return objective, tokenizer


class StepScorer:
    """What `score-steps` (and `infer`) run for a confidence_head checkpoint (app.tasks.protocol.Predictor)."""

    default_output = DEFAULT_OUTPUT
    verb = "score"

    def fingerprint_parts(self, cfg) -> dict:
        return {}

    def read_input(self, path: Path, cfg):
        try:
            records = read_records(path)
            fmt = detect_format(path, records[0].values)
        except UserError as err:  # say what this checkpoint expects, not only what the file lacks
            raise UserError(f"{err}; a confidence_head checkpoint scores step JSONL "
                            '({"problem": ..., "steps": [...]} per line)') from None
        if fmt != "generic":
            raise UserError(f"{path}: {fmt} records; score-steps reads the generic step JSONL "
                            f"(python -m app steps convert {path} OUT.jsonl)")
        rows = read_step_file(path, "generic", cfg.step_marker, require_labels=False)
        for r in rows:
            r.values["source"] = str(path)
        return rows

    def output_paths(self, output: Path) -> JsonlOutputs:
        return JsonlOutputs(output, DEFAULT_OUTPUT, "scores")

    def load(self, checkpoint: Path, cfg, device):
        return load_scorer(checkpoint, cfg, device)

    def predict(self, state, cfg, rows, device, skip):
        objective, tokenizer = state
        features = [encode_steps(r.values["problem"], r.values["steps"], r.values["labels"], tokenizer,
                                 cfg.step_marker, cfg.max_seq_length, r.line, r.values["source"]) for r in rows]
        for batch, scores in score_features(objective, features, tokenizer.pad_token_id, device, cfg.infer_batch_size,
                                            skip=skip):
            yield [{"i": i, "scores": s} for i, s in zip(batch, scores)]

    def finish(self, rows, records: list[dict], paths: JsonlOutputs, summary: dict, examples: int) -> dict:
        scores = [r["scores"] for r in records]
        lines = []
        for i, (row, s) in enumerate(zip(rows, scores)):
            rec = {"index": i, "line": row.line, **({"id": row.values["id"]} if "id" in row.values else {}), "scores": s}
            lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
        summary.update(steps=sum(len(s) for s in scores), steps_cut=sum(x is None for s in scores for x in s))
        s_flat, y_flat = labelled_pairs([r.values["labels"] for r in rows], scores)
        summary["labelled_steps"] = len(y_flat)
        if y_flat:
            summary["metrics"] = step_metrics(s_flat, y_flat)
            summary["calibration"] = calibration_report(np.clip(s_flat, 0, 1), (np.asarray(y_flat) >= 0.5).astype(float))
        write_atomic(paths.main, "".join(lines))
        write_json_atomic(paths.metrics, summary)
        print(f"{len(rows)} rows, {summary['steps']} steps scored ({summary['steps_cut']} cut by max_seq_length: "
              "null scores)")
        if y_flat:
            m = summary["metrics"]
            print("  ".join(f"{k}={m[k]:.4f}" for k in ("mse", "mae", "pearson", "spearman", "auroc", "ece")) +
                  f"  (over {len(y_flat)} labelled steps)")
        print(f"wrote {paths.main}, {paths.metrics}", file=sys.stderr)
        return summary


def run(input_path, checkpoint=None, output=DEFAULT_OUTPUT, overrides=(), fresh=False, checkpoint_root="checkpoints",
        progress=True) -> dict:
    return run_predictor(input_path, checkpoint, output, overrides, fresh=fresh, examples=0, root=checkpoint_root,
                         progress=progress, task_name="confidence_head")
