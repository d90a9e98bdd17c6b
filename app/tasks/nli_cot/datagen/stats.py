"""`cot stats`: what a generate/reflect output holds, printed and saved as JSON, with a histogram PNG.

First-pass accuracy (and parse failures), rows reflected and reflection success, thought length in tokens of the
model to be trained (its tokenizer: `tokenizer` in the config), accuracy by band of total tokens (the training
prompt + the JSON answer, the length the model is trained on; bands from `length_bands`), and the cost.
The PNG is drawn on matplotlib's Agg canvas (imported only here; skipped with a note naming the install without it).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from app.atomic import write_atomic, write_json_atomic
from app.errors import UserError
from app.tasks.nli_cot.datagen.pipeline import as_float, as_int, check_output, is_correct, read_items


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as err:  # noqa: BLE001 - a hub name that is not there, a directory without a tokenizer
        raise UserError(f"tokenizer={name!r}: cannot load it ({' '.join(str(err).split())[:200]}); pass "
                        "--tokenizer=DIR_OR_HUB_NAME of the model to be trained") from None


def _dist(values: list[int]) -> dict | None:
    if not values:
        return None
    s = sorted(values)
    return {"n": len(s), "mean": round(statistics.fmean(s), 2), "median": statistics.median(s),
            "p90": s[min(len(s) - 1, int(0.9 * len(s)))], "min": s[0], "max": s[-1]}


def _bands(edges: list[int]) -> list[tuple[int, int | None]]:
    lows = [0, *edges]
    return [(lo, edges[i] if i < len(edges) else None) for i, lo in enumerate(lows)]


def compute(items, cfg, tokenizer) -> tuple[dict, dict]:
    from app.tasks.nli_cot.config import DEFAULT_PROMPT
    from app.tasks.nli_cot.prompts import build_target

    labelled = [it for it in items if it.label is not None]
    first_ok = [it for it in items if it.values.get("status", "ok") == "ok" and it.values.get("thought_process")]
    correct = [it for it in labelled if is_correct(it.values, it.label)]
    reflected = [it for it in items if str(it.values.get("reflected", "")).lower() == "true"
                 or it.values.get("reflected") is True]
    reflected_ok = [it for it in reflected if it.values.get("reflection_status") == "ok"]

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def total(it, thought, label) -> int:
        prompt = DEFAULT_PROMPT.format(premise=it.premise, hypothesis=it.hypothesis)
        return len(tokenizer(prompt + build_target(label, thought))["input_ids"])

    first_thought = [count(str(it.values["thought_process"])) for it in first_ok]
    reflected_thought = [count(str(it.values.get("reflection") or "")) for it in reflected_ok]
    bands = []
    per_row = []
    for it in first_ok:
        if it.label is None:
            continue
        per_row.append((total(it, str(it.values["thought_process"]), as_int(it.values.get("predicted_label")) or 0),
                        is_correct(it.values, it.label)))
    for lo, hi in _bands(cfg.length_bands):
        inside = [c for n, c in per_row if n >= lo and (hi is None or n < hi)]
        bands.append({"band": f"{lo}-{hi}" if hi is not None else f">={lo}", "rows": len(inside),
                      "accuracy": round(sum(inside) / len(inside), 4) if inside else None})
    first_cost = sum(as_float(it.values.get("cost_usd")) for it in items)
    reflect_cost = sum(as_float(it.values.get("reflect_cost_usd")) for it in items)
    stats = {
        "rows": len(items), "labelled": len(labelled),
        "first_pass": {"model": next((it.values.get("model") for it in items if it.values.get("model")), None),
                       "ok": len(first_ok), "failed": len(items) - len(first_ok), "correct": len(correct),
                       "accuracy": round(len(correct) / len(labelled), 4) if labelled else None},
        "reflection": {"rows_reflected": len(reflected), "ok": len(reflected_ok),
                       "success": round(len(reflected_ok) / len(reflected), 4) if reflected else None,
                       "inconsistent": sum(it.values.get("reflection_status") == "inconsistent" for it in reflected)},
        "training_rows": len(correct) + len(reflected_ok),
        "tokenizer": cfg.tokenizer,
        "thought_tokens": {"first_pass": _dist(first_thought), "reflected": _dist(reflected_thought)},
        "accuracy_by_total_tokens": bands,
        "cost_usd": {"first_pass": round(first_cost, 6), "reflection": round(reflect_cost, 6),
                     "total": round(first_cost + reflect_cost, 6)},
    }
    return stats, {"first_pass": first_thought, "reflected": reflected_thought}


def render_histogram_png(lengths: dict[str, list[int]], title: str) -> bytes:
    """PNG bytes of the thought-length histogram (first pass and reflected); ImportError without matplotlib."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    every = [n for v in lengths.values() for n in v]
    bins = min(40, max(5, len(set(every)))) if every else 10
    lo, hi = (min(every), max(every) + 1) if every else (0, 1)
    for name, values in lengths.items():
        if values:
            ax.hist(values, bins=bins, range=(lo, hi), alpha=0.6, label=f"{name} (n={len(values)})")
    ax.set_xlabel("thought_process tokens")
    ax.set_ylabel("rows")
    ax.set_title(title)
    if every:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def run_stats(input_path, output, plot, cfg) -> dict:
    items = read_items(input_path, cfg, need_label=False, extra=("thought_process",))
    out = check_output(output, input_path)
    png = Path(plot) if plot else out.with_suffix(".png")
    check_output(png, input_path)
    tokenizer = load_tokenizer(cfg.tokenizer)
    stats, lengths = compute(items, cfg, tokenizer)
    try:
        write_atomic(png, render_histogram_png(lengths, f"Thought length ({Path(cfg.tokenizer).name} tokens)"))
        stats["histogram"] = str(png)
    except ImportError:
        from app.packages import install_hint

        print(f"note: matplotlib is not installed ({install_hint('matplotlib')}): no histogram", file=sys.stderr)
        stats["histogram"] = None
    write_json_atomic(out, stats)
    print(json.dumps(stats, indent=2))
    return stats
