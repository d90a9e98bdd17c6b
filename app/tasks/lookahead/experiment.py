"""The lookahead experiment: MiniGPT and ConfidenceAwareGPT over several seeds, as ordinary engine runs.

    python -m app experiment configs/lookahead.py [--max_steps=N ...]

Every run is `app.train.train` on the experiment's config with `seed`, `lookahead_model` and
`out_dir = <out_dir>/<model>_seed<seed>` set: its own checkpoints, metrics.jsonl, progress bar and exact resume. Both
models of a seed see the same data order, steps, batch and tokens. A run that stops before its last step (a kill,
SIGTERM, `stop_after_steps`) stops the experiment; re-running the same command skips finished runs (the engine sees
their final checkpoint) and resumes the unfinished one.

When every run is done, each final checkpoint is evaluated the same way (app.tasks.lookahead.task.evaluate_model:
perplexity at every dev position; for ConfidenceAwareGPT predicted vs actual future loss, and the perplexity with
confidence inputs shuffled across the batch), and the experiment writes
    <experiment_results_dir>/<timestamp>_results.json     full config, per-run histories and figures, summary
    <experiment_results_dir>/<timestamp>_loss_curves.png  train LM loss and eval perplexity, mean and min-max band
    <experiment_results_dir>/<timestamp>_calibration.png  binned predicted vs actual future loss, Spearman
    <experiment_results_dir>/<timestamp>_time.png         wall time and steps to a common perplexity
and prints the summary table (mean +/- std over seeds per metric, and the paired difference confidence - plain).
`python -m app plot RESULTS.json` redraws the plots and the table from the JSON.

Re-running a finished experiment evaluates nothing and writes nothing new: the results JSON holds a fingerprint of
the resolved config and of every run's final checkpoint, and when the results folder already has results with the
same fingerprint the command prints their table and paths ("up to date"), redraws only plots that are missing, and
exits 0. A changed setting or a retrained run gives a new fingerprint, hence new results beside the old ones.

Checks that can fail do so before any training: the config, the model shape (d_model a multiple of n_head), and
that the run and results folders can be created.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
import time
from pathlib import Path

from app.atomic import write_json_atomic
from app.errors import UserError

log = logging.getLogger(__name__)
TIME_FILE = "experiment_time.json"
SUMMARY_METRICS = ("perplexity", "perplexity_shuffled_confidence", "final_train_lm_loss", "wall_time_s",
                   "tokens_per_s", "steps_to_target", "confidence_mae", "confidence_spearman", "parameters")


def run_configs(config_file, overrides) -> list:
    """The configs of the experiment's runs, in order (seed-major, so each seed's two models run together)."""
    from app.config import load_config

    base = load_config(config_file, overrides)
    if base.task != "lookahead":
        raise UserError(f"{config_file}: task={base.task!r}; the experiment needs task='lookahead'")
    check_model_shape(base)
    root = base.out_dir.rstrip("/")
    runs = []
    for seed in base.experiment_seeds:
        for model in base.experiment_models:
            extra = [f"--seed={seed}", f"--lookahead_model={model}", f"--out_dir={root}/{model}_seed{seed}"]
            runs.append(load_config(config_file, [*overrides, *extra]))
    return [base, runs]


def check_model_shape(cfg) -> None:
    """The shape checks the models make when built, as a one-line error before any training."""
    if cfg.d_model % cfg.n_head:
        raise UserError(f"n_head={cfg.n_head}: d_model={cfg.d_model} is not a multiple of it (each attention head "
                        "gets d_model / n_head dimensions)")


def _finished(cfg) -> bool:
    return (Path(cfg.out_dir) / "checkpoints" / "final" / "trainer_state.json").is_file()


def _add_time(cfg, seconds: float) -> float:
    path = Path(cfg.out_dir) / TIME_FILE
    total = json.loads(path.read_text())["wall_time_s"] if path.is_file() else 0.0
    total += seconds
    write_json_atomic(path, {"wall_time_s": total})
    return total


def run_experiment(config_file, overrides=(), results_dir: str | None = None) -> Path | int:
    """Train every run (resuming unfinished ones), then evaluate, write results and plots; the results path, or the
    stopped run's exit code when a run stopped early (0 for stop_after_steps, 130/143 for SIGINT/SIGTERM; re-run to
    continue)."""
    from app.train import train
    from app.runs import check_new_folder

    overrides = list(overrides)
    base, runs = run_configs(config_file, overrides)
    out_dir = Path(results_dir or base.experiment_results_dir)
    check_new_folder(out_dir, f"--results-dir {out_dir}" if results_dir else f"experiment_results_dir={str(out_dir)!r}")
    check_new_folder(Path(base.out_dir), f"out_dir={base.out_dir!r}")
    print(parameter_table(base))
    for cfg in runs:
        if _finished(cfg):
            log.info("%s: finished, skipped", cfg.out_dir)
            continue
        start = time.perf_counter()
        rc = train(cfg)
        _add_time(cfg, time.perf_counter() - start)
        if rc != 0 or not _finished(cfg):
            print(f"experiment stopped during {cfg.out_dir} (exit {rc}); re-run the same command to continue")
            return rc
    fingerprint = results_fingerprint(base, runs)
    existing = finished_results(out_dir, fingerprint)
    if existing is not None:
        return report_existing(existing)
    results = {**collect(base, runs, config_file, overrides), "fingerprint": fingerprint}
    stamp = free_stamp(out_dir)
    path = out_dir / f"{stamp}_results.json"
    write_json_atomic(path, results)
    plots = write_plots(results, out_dir / stamp)
    print(summary_table(results))
    print(f"results: {path}")
    for p in plots:
        print(f"plot: {p}")
    return path


def free_stamp(out_dir: Path) -> str:
    """This second's timestamp, with a counter when results of the same second exist (two quick runs must never
    write over each other's results)."""
    stamp = base = time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while (out_dir / f"{stamp}_results.json").exists():
        n += 1
        stamp = f"{base}-{n}"
    return stamp


def _final_digest(cfg) -> str:
    """sha256 of a finished run's final checkpoint, through its manifest (which holds every file's sha256)."""
    final = Path(cfg.out_dir) / "checkpoints" / "final"
    listing = final / "manifest.json"
    return hashlib.sha256((listing if listing.is_file() else final / "trainer_state.json").read_bytes()).hexdigest()


def results_fingerprint(base, runs) -> str:
    """What the results depend on: the resolved config and every run's final checkpoint."""
    parts = {"config": base.model_dump(mode="json"), "finals": {str(cfg.out_dir): _final_digest(cfg) for cfg in runs}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def finished_results(out_dir: Path, fingerprint: str) -> Path | None:
    """The newest results JSON in `out_dir` written for the same config and final checkpoints, if any."""
    for path in sorted(out_dir.glob("*_results.json"), reverse=True):
        try:
            if json.loads(path.read_text(encoding="utf-8")).get("fingerprint") == fingerprint:
                return path
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError):
            continue  # not results of this program: never matched, never touched
    return None


def report_existing(path: Path) -> Path:
    """Print the table and paths of finished results; draw only the plots that are missing."""
    results = load_results(path)
    prefix = path.with_name(path.name.removesuffix("_results.json"))
    plots = plot_paths(prefix)
    if not all(p.is_file() for p in plots):
        plots = write_plots(results, prefix, only_missing=True) or [p for p in plots if p.is_file()]
    print(summary_table(results))
    print(f"results: {path} (up to date: every run finished and unchanged since; delete the results file to "
          "evaluate again)")
    for p in plots:
        print(f"plot: {p}")
    return path


def parameter_table(cfg) -> str:
    """Both models' parameters by part, and how far apart the totals are."""
    from app.tasks.lookahead.model import GPT, parameter_breakdown, shapes

    sh = shapes(257, cfg.context_length + 1, cfg.n_layer, cfg.n_head, cfg.d_model, cfg.mlp_ratio,
                cfg.confidence_init_bias)
    counts = {k: parameter_breakdown(GPT(s)) for k, s in sh.items()}
    lines = [f"parameters  {'plain (d_mlp=' + str(sh['plain'].d_mlp) + ')':>22}  "
             f"{'confidence (d_mlp=' + str(sh['confidence'].d_mlp) + ')':>27}"]
    for part in counts["plain"]:
        lines.append(f"  {part:<22}{counts['plain'][part]:>12,}  {counts['confidence'][part]:>27,}")
    a, b = counts["plain"]["total"], counts["confidence"]["total"]
    lines.append(f"  totals differ by {100 * abs(a - b) / b:.3f}%")
    return "\n".join(lines)


# --- collecting ----------------------------------------------------------------------------------------------------
def history(out_dir: Path) -> dict:
    """Per-step training losses and per-eval metrics of a run's metrics.jsonl."""
    from app.metrics.plots import read_metrics

    train, evals, tps = {}, {}, []
    for rec in read_metrics(Path(out_dir) / "metrics.jsonl"):
        s = rec["step"]
        for k, v in rec.items():
            if k.startswith("loss"):
                train.setdefault(k, []).append([s, v])
            elif k.startswith("eval/"):
                evals.setdefault(k[5:], []).append([s, v])
            elif k == "tokens_per_s":
                tps.append([s, v])
    return {"train": train, "eval": evals, "tokens_per_s": tps}


def final_evaluation(cfg) -> dict:
    """The final checkpoint evaluated on the whole dev text, the same way for both models."""
    import torch

    from app.tasks.lookahead.model import parameter_breakdown
    from app.tasks.lookahead.task import Lookahead, dev_tensor, evaluate_model

    task = Lookahead()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = task.model_kind(cfg).load(cfg, device, Path(cfg.out_dir) / "checkpoints" / "final")
    data = dev_tensor(task.load_rows(cfg, "dev"), tokenizer, cfg)
    out = evaluate_model(model, data, cfg.eval_batch_size, keep_pairs=cfg.calibration_points)
    if model.shape.confidence:
        out["perplexity_shuffled_confidence"] = evaluate_model(model, data, cfg.eval_batch_size, shuffle=True)[
            "perplexity"]
    out["parameters"] = parameter_breakdown(model)
    return out


def steps_to(points: list, target: float) -> int | None:
    return next((s for s, v in points if v <= target), None)


def collect(base, runs, config_file, overrides) -> dict:
    per_run: dict[str, dict[str, dict]] = {}
    for cfg in runs:
        h = history(Path(cfg.out_dir))
        ev = final_evaluation(cfg)
        time_path = Path(cfg.out_dir) / TIME_FILE
        tps = [v for _, v in h["tokens_per_s"]]
        lm = h["train"].get("loss/lm") or h["train"].get("loss") or []
        record = {"out_dir": str(cfg.out_dir), "history": h, "final": ev,
                  "wall_time_s": json.loads(time_path.read_text())["wall_time_s"] if time_path.is_file() else None,
                  "tokens_per_s": statistics.fmean(tps) if tps else None,
                  "final_train_lm_loss": statistics.fmean(v for _, v in lm[-10:]) if lm else None}
        per_run.setdefault(cfg.lookahead_model, {})[str(cfg.seed)] = record
    # convergence: eval steps until the perplexity every run reaches (the worst final perplexity)
    curves = [r["history"]["eval"].get("perplexity", []) for m in per_run.values() for r in m.values()]
    target = max((c[-1][1] for c in curves if c), default=None)
    for m in per_run.values():
        for r in m.values():
            r["steps_to_target"] = steps_to(r["history"]["eval"].get("perplexity", []), target) if target else None
    results = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config_file": str(config_file),
               "overrides": list(overrides), "config": base.model_dump(), "target_perplexity": target,
               "runs": per_run}
    results["summary"] = summarise(results)
    return results


def _metric(record: dict, name: str):
    if name in ("wall_time_s", "tokens_per_s", "final_train_lm_loss", "steps_to_target"):
        return record.get(name)
    if name == "parameters":
        return record["final"]["parameters"]["total"]
    return record["final"].get(name)


def _mean_std(values: list[float]) -> dict:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarise(results: dict) -> dict:
    """Per model and metric: mean, std, n over seeds; per metric the paired difference confidence - plain."""
    runs = results["runs"]
    out = {"models": {}, "difference": {}}
    for model, by_seed in runs.items():
        out["models"][model] = {m: _mean_std([_metric(r, m) for r in by_seed.values()]) for m in SUMMARY_METRICS}
    if "plain" in runs and "confidence" in runs:
        seeds = sorted(set(runs["plain"]) & set(runs["confidence"]), key=int)
        for m in SUMMARY_METRICS:
            diffs = []
            for s in seeds:
                a, b = _metric(runs["confidence"][s], m), _metric(runs["plain"][s], m)
                if a is not None and b is not None:
                    diffs.append(a - b)
            out["difference"][m] = _mean_std(diffs)
    return out


def summary_table(results: dict) -> str:
    s = results["summary"]
    models = list(s["models"])

    def fmt(d):
        if not d or d.get("mean") is None:
            return "-"
        return f"{d['mean']:.4g} +/- {d['std']:.2g}"

    header = ["metric", *models] + (["confidence - plain"] if s["difference"] else [])
    rows = [header]
    for m in SUMMARY_METRICS:
        row = [m, *(fmt(s["models"][k].get(m)) for k in models)]
        if s["difference"]:
            row.append(fmt(s["difference"].get(m)))
        if any(c != "-" for c in row[1:]):
            rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    n = max((d["n"] for d in s["models"].get(models[0], {}).values()), default=0) if models else 0
    return "\n".join([f"summary over {n} seed(s) (mean +/- std)", lines[0], "-" * len(lines[0]), *lines[1:]])


def load_results(path) -> dict:
    """A results JSON, checked to have everything the table and the plots read (UserError naming the key)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {'is a directory, not a file' if path.is_dir() else 'file not found'}")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise UserError(f"{path}: cannot read the results ({' '.join(str(err).split())})") from None
    if not isinstance(results, dict) or "runs" not in results or "summary" not in results:
        raise UserError(f"{path}: not a lookahead experiment results file (no 'runs' / 'summary')")
    ResultsShape(path).check(results)
    return results


class ResultsShape:
    """The shape of a results JSON that summary_table and the plots rely on; the first difference is a one-line
    UserError naming the file and the key (e.g. `runs.plain.7.history.train`)."""

    KINDS = {"an object": dict, "a list": list}
    NOT_RESULTS = " (not a lookahead experiment results file, or a damaged one)"

    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, expected: str, value) -> UserError:
        found = json.dumps(value)
        found = found if len(found) <= 40 else found[:37] + "..."
        return UserError(f"{self.path}: {where}: expected {expected}, found {found}{self.NOT_RESULTS}")

    def get(self, container: dict, key: str, where: str, expected: str):
        """container[key] of the expected kind ("an object", "a list", "a number", "a number or null")."""
        if key not in container:
            raise UserError(f"{self.path}: {where}: missing{self.NOT_RESULTS}")
        value = container[key]
        if expected in self.KINDS:
            ok = isinstance(value, self.KINDS[expected])
        else:
            ok = (value is None and expected.endswith("or null")) or (isinstance(value, (int, float))
                                                                     and not isinstance(value, bool))
        if not ok:
            raise self.fail(where, expected, value)
        return value

    def series(self, value, where: str) -> None:
        """[[step, value], ...]"""
        for i, point in enumerate(value):
            if not (isinstance(point, list) and len(point) == 2 and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in point)):
                raise self.fail(f"{where}[{i}]", "a [step, value] pair of numbers", point)

    def numbers(self, value, where: str) -> None:
        for i, x in enumerate(value):
            if not isinstance(x, (int, float)) or isinstance(x, bool):
                raise self.fail(f"{where}[{i}]", "a number", x)

    def check(self, results: dict) -> None:
        runs = self.get(results, "runs", "runs", "an object")
        if not runs:
            raise UserError(f"{self.path}: runs: empty (no run to show)")
        for model, by_seed in runs.items():
            if not isinstance(by_seed, dict):
                raise self.fail(f"runs.{model}", "an object (seed -> run)", by_seed)
            for seed, record in by_seed.items():
                self.run(record, f"runs.{model}.{seed}")
        if "target_perplexity" in results:
            self.get(results, "target_perplexity", "target_perplexity", "a number or null")
        summary = self.get(results, "summary", "summary", "an object")
        for part in ("models", "difference"):
            table = self.get(summary, part, f"summary.{part}", "an object")
            for name, metrics in table.items():
                if part == "models":
                    if not isinstance(metrics, dict):
                        raise self.fail(f"summary.models.{name}", "an object (metric -> mean, std, n)", metrics)
                    for metric, stats in metrics.items():
                        self.stats(stats, f"summary.models.{name}.{metric}")
                else:
                    self.stats(metrics, f"summary.difference.{name}")

    def run(self, record, where: str) -> None:
        if not isinstance(record, dict):
            raise self.fail(where, "an object (one run)", record)
        history = self.get(record, "history", f"{where}.history", "an object")
        for part in ("train", "eval"):
            for name, points in self.get(history, part, f"{where}.history.{part}", "an object").items():
                if not isinstance(points, list):
                    raise self.fail(f"{where}.history.{part}.{name}", "a list of [step, value] pairs", points)
                self.series(points, f"{where}.history.{part}.{name}")
        final = self.get(record, "final", f"{where}.final", "an object")
        pairs = final.get("pairs")
        if pairs is not None:
            if not isinstance(pairs, dict):
                raise self.fail(f"{where}.final.pairs", "an object", pairs)
            for key in ("predicted", "actual"):
                if key in pairs:
                    self.numbers(self.get(pairs, key, f"{where}.final.pairs.{key}", "a list"),
                                 f"{where}.final.pairs.{key}")
            if len(pairs.get("predicted", [])) != len(pairs.get("actual", [])):
                raise UserError(f"{self.path}: {where}.final.pairs: predicted and actual differ in length")
        for key in ("wall_time_s", "steps_to_target"):
            self.get(record, key, f"{where}.{key}", "a number or null")

    def stats(self, stats, where: str) -> None:
        if not isinstance(stats, dict):
            raise self.fail(where, "an object with mean, std, n", stats)
        mean = self.get(stats, "mean", f"{where}.mean", "a number or null")
        self.get(stats, "std", f"{where}.std", "a number or null" if mean is None else "a number")
        if not isinstance(stats.get("n"), int) or isinstance(stats.get("n"), bool):
            raise self.fail(f"{where}.n", "an integer", stats.get("n"))


# --- plots ---------------------------------------------------------------------------------------------------------
_COLORS = {"plain": "#4682b4", "confidence": "#d73c32"}


def _band(ax, series: list[list], color, label):
    """Mean line and min-max band of several [[step, value], ...] series on the steps they share."""
    if not series:
        return
    steps = sorted(set.intersection(*(set(s for s, _ in c) for c in series)))
    if not steps:
        return
    vals = [[dict(map(tuple, c))[s] for s in steps] for c in series]
    mean = [statistics.fmean(col) for col in zip(*vals)]
    ax.plot(steps, mean, color=color, label=f"{label} (n={len(series)})")
    ax.fill_between(steps, [min(col) for col in zip(*vals)], [max(col) for col in zip(*vals)], color=color, alpha=0.2)


PLOT_KINDS = ("loss_curves", "calibration", "time")


def plot_paths(prefix: Path) -> list[Path]:
    """Where the plots of results `<prefix>_results.json` go, in PLOT_KINDS order."""
    return [Path(f"{prefix}_{kind}.png") for kind in PLOT_KINDS]


def write_plots(results: dict, prefix: Path, only_missing: bool = False) -> list[Path]:
    """The three PNGs next to the results (`<prefix>_loss_curves.png`, ...), all drawn before any is written;
    [] without matplotlib. `only_missing`: keep the ones already there."""
    from app.atomic import write_atomic

    pngs = render_plots(results)
    if pngs is None:
        return []
    paths = plot_paths(Path(prefix))
    for path, png in zip(paths, pngs):
        if not (only_missing and path.is_file()):
            write_atomic(path, png)
    return paths


def render_plots(results: dict) -> list[bytes] | None:
    """The PNG bytes of the plots, in PLOT_KINDS order; None without matplotlib."""
    try:
        from app.metrics.plots import _matplotlib, _png
        Figure, Canvas = _matplotlib()
    except ImportError:
        log.warning("plots skipped: matplotlib is not installed")
        return None

    runs = results["runs"]
    pngs = []

    fig = Figure(figsize=(11, 4.2), dpi=100)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for model, by_seed in runs.items():
        color = _COLORS.get(model, "#444444")
        _band(ax1, [r["history"]["train"].get("loss/lm") or r["history"]["train"].get("loss", [])
                    for r in by_seed.values()], color, model)
        if model == "confidence":
            _band(ax1, [r["history"]["train"].get("loss/confidence", []) for r in by_seed.values()], "#a01e16",
                  "confidence MSE")
        _band(ax2, [r["history"]["eval"].get("perplexity", []) for r in by_seed.values()], color, model)
    ax1.set(title="train LM loss (mean, min-max over seeds)", xlabel="step", ylabel="loss")
    ax2.set(title="eval perplexity (all positions)", xlabel="step", ylabel="perplexity")
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    pngs.append(_png(fig, Canvas))

    fig = Figure(figsize=(5.5, 5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    from app.tasks.lookahead.step import spearman

    pred, act = [], []
    for r in runs.get("confidence", {}).values():
        pairs = r["final"].get("pairs") or {}
        pred += pairs.get("predicted", [])
        act += pairs.get("actual", [])
    if pred:
        lo, hi = min(pred + act), max(pred + act)
        n_bins = 12
        edges = [lo + (hi - lo) * i / n_bins for i in range(n_bins + 1)]
        xs, ys, ns = [], [], []
        for a, b in zip(edges, edges[1:]):
            sel = [y for x, y in zip(pred, act) if a <= x < b or (b == hi and x == hi)]
            if sel:
                xs.append(statistics.fmean([x for x in pred if a <= x < b or (b == hi and x == hi)]))
                ys.append(statistics.fmean(sel))
                ns.append(len(sel))
        ax.scatter(pred[:2000], act[:2000], s=3, alpha=0.15, color="#8c8c8c", label="pairs")
        ax.plot(xs, ys, "o-", color=_COLORS["confidence"], label="binned mean actual")
        ax.plot([lo, hi], [lo, hi], "--", color="#6e6e6e", label="perfect")
        rho = spearman(pred, act)
        ax.set_title(f"predicted vs actual future loss (Spearman {rho:.3f}, n={len(pred)})", fontsize=9)
        ax.legend(fontsize=8)
    else:
        ax.set_title("no confidence runs")
    ax.set(xlabel="predicted future loss", ylabel="actual future loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    pngs.append(_png(fig, Canvas))

    fig = Figure(figsize=(9, 4), dpi=100)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    models = list(runs)
    for i, model in enumerate(models):
        recs = list(runs[model].values())
        t = [r["wall_time_s"] or 0 for r in recs]
        c = [r["steps_to_target"] or 0 for r in recs]
        color = _COLORS.get(model, "#444444")
        ax1.bar(i, statistics.fmean(t), yerr=statistics.stdev(t) if len(t) > 1 else 0, color=color, capsize=4)
        ax2.bar(i, statistics.fmean(c), yerr=statistics.stdev(c) if len(c) > 1 else 0, color=color, capsize=4)
    for ax, title in ((ax1, "training wall time (s)"), (ax2, f"steps to perplexity "
                                                              f"{results.get('target_perplexity') or 0:.3g}")):
        ax.set_xticks(range(len(models)), models)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    pngs.append(_png(fig, Canvas))
    return pngs
