"""Steps every pipeline shares: the embedded tiny model, a training run, the report."""

from __future__ import annotations

from pathlib import Path

from app.pipelines.steps import Step

ROOT = Path(__file__).resolve().parents[2]  # the checkout: configs/ and data/ live here
SHARED_FIXTURES = ROOT.parent / "shared" / "fixtures"


def tiny_model(work: Path) -> Step:
    return Step("tiny-model", ["tiny-model", str(work / "base")], [], [work / "base" / "model.safetensors"], 3)


def final_of(run: Path) -> Path:
    """What a finished training run leaves that later steps read (the final checkpoint's manifest)."""
    return run / "checkpoints" / "final" / "manifest.json"


def train(name: str, config: str, run: Path, inputs: list[Path], expect_s: float, *overrides: str,
          tiny_base: Path | None = None) -> Step:
    """`train CONFIG --out_dir=RUN [--key=value ...]`, on the embedded tiny model at `tiny_base` when given."""
    base = [f"--model_name={tiny_base}", "--create_tiny_model=False"] if tiny_base else []
    inputs = [ROOT / config if not Path(config).is_absolute() else Path(config), *inputs,
              *([tiny_base / "model.safetensors"] if tiny_base else [])]
    return Step(name, ["train", config, f"--out_dir={run}", *base, *overrides], inputs,
                [final_of(run), run / "metrics.jsonl"], expect_s, redo_args=["--resume=fresh"])


def predict(name: str, verb: list[str], src: Path, run: Path, out: Path, expect_s: float,
            metrics: bool = True) -> Step:
    """`VERB... SRC --checkpoint=RUN --output=OUT` on a finished run: OUT, and beside it OUT-stem.metrics.json when
    the command writes one."""
    side = [out.with_name(out.stem + ".metrics.json")] if metrics else []
    return Step(name, [*verb, str(src), f"--checkpoint={run}", f"--output={out}"], [src, final_of(run)],
                [out, *side], expect_s)


def report(work: Path, *runs: Path, inputs: list[Path] | None = None, attach: dict[str, Path] | None = None) -> Step:
    """`report RUN... --output WORK/report.md [--attach TITLE=FILE.json ...]`: the page the pipeline ends with."""
    attach = attach or {}
    return Step("report", ["report", *map(str, runs), f"--output={work / 'report.md'}",
                           *(f"--attach={title}={path}" for title, path in attach.items())],
                [*(inputs if inputs is not None else [r / "metrics.jsonl" for r in runs]), *attach.values()],
                [work / "report.md"], 3)
