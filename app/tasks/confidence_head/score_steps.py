"""`python -m app score-steps INPUT.jsonl [--checkpoint DIR] [--output FILE] [--fresh] [--key=value ...]`.

Per-step confidences from a trained `confidence_head` checkpoint for step-by-step solutions in the generic step
JSONL (`{"problem": ..., "steps": [...], "labels": [...]}`, labels optional, an `id` is copied; other formats convert
with `python -m app.tasks.confidence_head.step_data convert`).

Checkpoint and config: as `python -m app infer` (a checkpoint or run directory, else the newest run under
checkpoints/; the checkpoint's run_config.json, then `--key=value` overrides such as `--infer_batch_size=8`).

Outputs, for `--output DIR/NAME.jsonl` (default `step_scores.jsonl`):
  DIR/NAME.jsonl               one line per input record, in input order (blank input lines are skipped):
                               {"index": i, "line": input line, "id": ..., "scores": [one confidence per step]};
                               a step cut off by max_seq_length has a null score
  DIR/NAME.metrics.json        counts, and when the input has labels: MSE, MAE, Pearson, Spearman, AUROC (label >= 0.5
                               is a correct step), ECE and the full calibration report, over the labelled steps
  DIR/NAME.jsonl.partial.jsonl finished batches (fsynced), so a re-run continues; removed at the end
Final files are written to a temporary file and renamed into place. Batches are length-sorted (`infer_batch_size`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from app.errors import UserError

log = logging.getLogger("app.tasks.confidence_head.score_steps")

DEFAULT_OUTPUT = "step_scores.jsonl"
CHECKPOINT_ROOT = Path("checkpoints")


def output_paths(output: str | Path) -> tuple[Path, Path, Path]:
    out = Path(output)
    stem = out.with_suffix("") if out.suffix else out
    if out.name.endswith(".metrics.json") or out.name.endswith(".partial.jsonl"):
        raise UserError(f"--output {out}: give the scores JSONL path (e.g. step_scores.jsonl)")
    return out, stem.with_name(stem.name + ".metrics.json"), out.with_name(out.name + ".partial.jsonl")


def load_scorer(ckpt: Path, cfg, device):
    """(objective in eval mode, tokenizer) from a confidence_head checkpoint."""
    from app.lm.modeling import is_adapter_dir, load_for_inference
    from app.tasks.confidence_head.task import ConfidenceHead, load_head

    if cfg.create_tiny_model and is_adapter_dir(ckpt) and not (Path(cfg.model_name) / "config.json").is_file():
        from app.lm.tiny import ensure_tiny_model

        ensure_tiny_model(cfg.model_name)  # an adapter over the embedded tiny model: its base is rebuilt as trained
    model, tokenizer = load_for_inference(ckpt, cfg, device)
    objective = ConfidenceHead().objective_for(model, cfg)
    load_head(objective.head, ckpt)
    objective.eval()
    return objective, tokenizer


def run(input_path: str | Path, checkpoint: str | None = None, output: str | Path = DEFAULT_OUTPUT,
        overrides: list[str] = (), fresh: bool = False, checkpoint_root: str | Path = CHECKPOINT_ROOT,
        progress: bool = True) -> dict:
    import torch

    from app.infer import PartialFile, _write_text_atomic, checkpoint_config, fingerprint, resolve_checkpoint
    from app.score import write_json_atomic
    from app.tasks.confidence_head.step_data import detect_format, read_records, read_step_file
    from app.tasks.confidence_head.task import encode_steps, labelled_pairs, score_features, step_metrics

    input_path = Path(input_path)
    records = read_records(input_path)  # bad input fails before any model loads
    fmt = detect_format(input_path, records[0].values)
    if fmt != "generic":
        raise UserError(f"{input_path}: {fmt} records; score-steps reads the generic step JSONL "
                        f"(python -m app.tasks.confidence_head.step_data convert {input_path} OUT.jsonl)")
    out, metrics_path, partial_path = output_paths(output)
    if out.resolve() == input_path.resolve():
        raise UserError(f"--output {out} is the input file; choose another path")
    ckpt, why = resolve_checkpoint(checkpoint, checkpoint_root)
    print(f"checkpoint: {ckpt} ({why})", file=sys.stderr)
    cfg = checkpoint_config(ckpt, list(overrides))
    if cfg.task != "confidence_head":
        raise UserError(f"{ckpt}: trained for task={cfg.task!r}; score-steps needs a confidence_head checkpoint")
    rows = read_step_file(input_path, "generic", cfg.step_marker, require_labels=False)
    n = len(rows)

    partial = PartialFile(partial_path, fingerprint(input_path, ckpt, cfg), n, fresh=fresh)
    started, t0 = len(partial.done), time.perf_counter()
    if 0 < started < n:
        print(f"resuming: {started} of {n} rows already scored in {partial_path}", file=sys.stderr)
    try:
        if started < n:
            from tqdm import tqdm

            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            objective, tokenizer = load_scorer(ckpt, cfg, device)
            features = [encode_steps(r.values["problem"], r.values["steps"], r.values["labels"], tokenizer,
                                     cfg.step_marker, cfg.max_seq_length, r.line, str(input_path)) for r in rows]
            bar = tqdm(total=n, initial=started, unit="row", desc="score", file=sys.stderr, disable=not progress)
            try:
                batches = score_features(objective, features, tokenizer.pad_token_id, device, cfg.infer_batch_size,
                                         skip=lambda batch: all(i in partial.done for i in batch))
                for batch, scores in batches:
                    bar.update(len(partial.add([{"i": i, "scores": s} for i, s in zip(batch, scores)])))
            finally:
                bar.close()
    finally:
        partial.close()
    missing = [i for i in range(n) if i not in partial.done]
    if missing:
        raise RuntimeError(f"{len(missing)} rows got no scores (first: row {missing[0]})")
    elapsed = time.perf_counter() - t0
    scores = [partial.done[i]["scores"] for i in range(n)]

    lines = []
    for i, (row, s) in enumerate(zip(rows, scores)):
        rec = {"index": i, "line": row.line}
        if "id" in row.values:
            rec["id"] = row.values["id"]
        rec["scores"] = s
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    summary: dict = {"input": str(input_path), "checkpoint": str(ckpt), "rows": n,
                     "steps": sum(len(s) for s in scores), "steps_cut": sum(x is None for s in scores for x in s),
                     "rows_scored_now": n - started,
                     "rows_per_s": round((n - started) / elapsed, 2) if elapsed > 0 and n > started else None}
    labels = [r.values["labels"] for r in rows]
    s_flat, y_flat = labelled_pairs(labels, scores)
    summary["labelled_steps"] = len(y_flat)
    if y_flat:
        import numpy as np

        from app.metrics.calibration import calibration_report

        summary["metrics"] = step_metrics(s_flat, y_flat)
        summary["calibration"] = calibration_report(np.clip(s_flat, 0, 1), (np.asarray(y_flat) >= 0.5).astype(float))
    _write_text_atomic(out, "".join(lines))
    write_json_atomic(metrics_path, summary)
    partial_path.unlink(missing_ok=True)

    print(f"{n} rows, {summary['steps']} steps scored ({summary['steps_cut']} cut by max_seq_length="
          f"{cfg.max_seq_length}: null scores)")
    if y_flat:
        m = summary["metrics"]
        print("  ".join(f"{k}={m[k]:.4f}" for k in ("mse", "mae", "pearson", "spearman", "auroc", "ece")) +
              f"  (over {len(y_flat)} labelled steps)")
    print(f"wrote {out}, {metrics_path}", file=sys.stderr)
    return summary


def _parser() -> argparse.ArgumentParser:
    from app.infer import checkpoint_command_parser

    return checkpoint_command_parser(
        "python -m app score-steps", "Per-step confidences of step-by-step solutions (generic step JSONL).",
        'JSONL: {"problem": ..., "steps": [...], "labels": [...] (optional)} per line', DEFAULT_OUTPUT,
        "scores JSONL")


def cli(argv: list[str]) -> int:
    args, rest = _parser().parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--") and "=" in a)]
    if bad:
        raise UserError(f"unexpected argument {bad[0]!r}; usage: python -m app score-steps INPUT [--checkpoint DIR] "
                        "[--output FILE] [--key=value ...]")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        run(args.input, args.checkpoint, args.output, rest, fresh=args.fresh)
    except KeyboardInterrupt:
        print("interrupted: finished batches are saved; re-run the same command to continue", file=sys.stderr)
        return 130
    return 0
