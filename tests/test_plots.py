"""app.metrics.plots: reliability diagrams and training curves drawn with matplotlib, and what happens without it."""

import builtins
import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from app.metrics import calibration as cal
from app.metrics import plots


def _pixels(path):
    """The RGB pixels (uint8) of a PNG, read back with matplotlib."""
    image = pytest.importorskip("matplotlib.image", reason="matplotlib (plots extra) draws the PNGs")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return np.round(image.imread(str(path))[..., :3] * 255).astype(np.uint8)


def _colours(rgb):
    return len(np.unique(rgb.reshape(-1, 3), axis=0))


def _reliability(seed, n=400, power=1.0):
    rng = np.random.default_rng(seed)
    s = rng.beta(2.5, 1.5, size=n)
    y = (rng.random(n) < s ** power).astype(int)
    return cal.reliability_data(s, y, n_bins=10)


def _write_metrics(path, steps=60, named_losses=False, torn=True):
    lines = []
    for step in range(1, steps + 1):
        rec = {"step": step, "loss": 3.0 * np.exp(-step / 15) + 0.1, "lr": 1e-3 * min(1.0, step / 10),
               "grad_norm": 1.5}
        if named_losses:
            rec["loss/lm"] = 2.0 * np.exp(-step / 20) + 0.05
            rec["loss/confidence"] = 0.6 * np.exp(-step / 30) + 0.1
        lines.append(json.dumps(rec))
        lines.append(json.dumps({"step": step, "tokens_per_s": 1000.0 + step}))
        if step % 20 == 0:
            lines.append(json.dumps({"step": step, "eval/dev_loss": 2.0 * np.exp(-step / 18) + 0.2,
                                     "eval/accuracy": 0.5 + step / 200}))
    text = "\n".join(lines) + "\n"
    if torn:
        text += '{"step": 61, "loss": 0.1'  # a run killed mid-write
    path.write_text(text)
    return path


@pytest.fixture
def no_matplotlib(monkeypatch):
    """Every ``import matplotlib...`` fails, as where the plots extra is not installed."""
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.setattr(plots, "_warned_missing", False)


# ------------------------------------------------------------------------------------------------------------------
# Importing never imports matplotlib
# ------------------------------------------------------------------------------------------------------------------


def test_importing_calibration_and_plots_does_not_import_matplotlib():
    code = ("import sys, app.metrics.calibration, app.metrics.plots; "
            "assert app.metrics.calibration.save_reliability_png is app.metrics.plots.save_reliability_png; "
            "assert not any(m == 'matplotlib' or m.startswith('matplotlib.') for m in sys.modules), 'imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------------------------------------
# Reliability diagram
# ------------------------------------------------------------------------------------------------------------------


def test_reliability_png_is_a_drawn_image(tmp_path):
    pytest.importorskip("matplotlib")
    path = plots.save_reliability_png(_reliability(1), tmp_path / "reliability_epoch_1.png")
    assert path == tmp_path / "reliability_epoch_1.png"
    rgb = _pixels(path)
    assert rgb.shape == (600, 600, 3)
    assert _colours(rgb) > 20
    assert (rgb == 255).all(axis=2).mean() > 0.3  # a white background ...
    blue = (np.abs(rgb.astype(int) - (0x46, 0x82, 0xB4)).max(axis=2) <= 8).mean()
    assert blue > 0.03  # ... with the accuracy bars on it
    assert [p.name for p in tmp_path.iterdir()] == ["reliability_epoch_1.png"]  # no temp file left


def test_reliability_png_of_different_data_differ(tmp_path):
    pytest.importorskip("matplotlib")
    a = _pixels(plots.save_reliability_png(_reliability(1, power=1.0), tmp_path / "a.png"))
    b = _pixels(plots.save_reliability_png(_reliability(2, power=3.0), tmp_path / "b.png"))
    again = _pixels(plots.save_reliability_png(_reliability(1, power=1.0), tmp_path / "a2.png"))
    assert a.shape == b.shape
    assert (a != b).any(axis=2).mean() > 0.01
    assert np.array_equal(a, again)  # the same data draws the same picture


def test_reliability_png_size_and_bad_input(tmp_path):
    pytest.importorskip("matplotlib")
    data = _reliability(3)
    assert _pixels(plots.save_reliability_png(data, tmp_path / "small.png", size=300)).shape == (300, 300, 3)
    with pytest.raises(ValueError, match="size"):
        plots.save_reliability_png(data, tmp_path / "tiny.png", size=50)
    with pytest.raises(ValueError, match="bins"):
        plots.save_reliability_png({"bins": []}, tmp_path / "empty.png")
    broken = json.loads(json.dumps(data))
    broken["bins"][0]["count"] = "many"
    with pytest.raises(ValueError, match="count"):
        plots.save_reliability_png(broken, tmp_path / "broken.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.png"]


def test_reliability_png_from_a_json_report_round_trip(tmp_path):
    """What a task writes as JSON draws the same diagram when read back."""
    pytest.importorskip("matplotlib")
    data = _reliability(4)
    cal.save_reliability_json(data, tmp_path / "r.json")
    again = json.loads((tmp_path / "r.json").read_text())
    a = _pixels(plots.save_reliability_png(data, tmp_path / "a.png"))
    b = _pixels(plots.save_reliability_png(again, tmp_path / "b.png"))
    assert np.array_equal(a, b)


def test_reliability_without_matplotlib_warns_once_and_skips(tmp_path, no_matplotlib, caplog):
    caplog.set_level(logging.DEBUG, logger="app.metrics.plots")
    data = _reliability(5)
    assert cal.save_reliability_png(data, tmp_path / "a.png") is None
    assert plots.save_reliability_png(data, tmp_path / "b.png") is None
    assert list(tmp_path.iterdir()) == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "pip install 'matplotlib==" in warnings[0].getMessage()
    with pytest.raises(ValueError, match="bins"):  # bad data is still an error, matplotlib or not
        plots.save_reliability_png({}, tmp_path / "c.png")


# ------------------------------------------------------------------------------------------------------------------
# Training curves
# ------------------------------------------------------------------------------------------------------------------


def test_read_metrics_skips_a_torn_last_line_and_junk(tmp_path):
    path = _write_metrics(tmp_path / "metrics.jsonl", steps=3)
    with open(path, "a") as f:
        f.write("\n\n[1, 2]\n{\"loss\": 1.0}\n{\"step\": true}\nnot json\n")
    records = plots.read_metrics(path)
    assert [r["step"] for r in records] == [1, 1, 2, 2, 3, 3]


def test_training_curves_from_metrics_with_a_torn_line(tmp_path):
    pytest.importorskip("matplotlib")
    _write_metrics(tmp_path / "metrics.jsonl")
    path = plots.save_training_curves(tmp_path)
    assert path == tmp_path / "training_curves.png"
    rgb = _pixels(path)
    assert rgb.shape[0] > 400 and rgb.shape[1] > 600
    assert _colours(rgb) > 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "training_curves.png"]


def test_training_curves_plot_every_named_loss(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "one").mkdir()
    (tmp_path / "many").mkdir()
    _write_metrics(tmp_path / "one" / "metrics.jsonl")
    _write_metrics(tmp_path / "many" / "metrics.jsonl", named_losses=True)
    train, evals, lr = plots._series(plots.read_metrics(tmp_path / "many" / "metrics.jsonl"))
    assert sorted(train) == ["loss", "loss/confidence", "loss/lm"]
    assert list(evals) == ["eval/dev_loss"] and len(evals["eval/dev_loss"]) == 3
    assert len(lr) == 60
    one = _pixels(plots.save_training_curves(tmp_path / "one"))
    many = _pixels(plots.save_training_curves(tmp_path / "many"))
    assert one.shape == many.shape and (one != many).any(axis=2).mean() > 0.005


def test_training_curves_loss_only_or_lr_only(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n"
                                                    for s in range(1, 20)))
    assert _colours(_pixels(plots.save_training_curves(tmp_path))) > 10
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "lr": 1e-4}) + "\n" for s in range(5)))
    assert plots.save_training_curves(tmp_path) is not None


def test_training_curves_with_nothing_to_plot(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="app.metrics.plots")
    assert plots.save_training_curves(tmp_path) is None  # no metrics.jsonl
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "tokens_per_s": 10.0}\n{"step": 2, "loss": NaN}\n{"ste')
    assert plots.save_training_curves(tmp_path) is None
    assert not (tmp_path / "training_curves.png").exists()
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 2 and "does not exist" in infos[0] and "no loss" in infos[1]


def test_training_curves_without_matplotlib(tmp_path, no_matplotlib, caplog):
    caplog.set_level(logging.INFO, logger="app.metrics.plots")
    _write_metrics(tmp_path / "metrics.jsonl")
    assert plots.save_training_curves(tmp_path) is None
    assert not (tmp_path / "training_curves.png").exists()
    messages = [r for r in caplog.records if r.name == "app.metrics.plots"]
    assert len(messages) == 1 and messages[0].levelno == logging.INFO
    assert "pip install 'matplotlib==" in messages[0].getMessage()


def test_training_curves_never_raise(tmp_path, monkeypatch, caplog):
    pytest.importorskip("matplotlib")
    _write_metrics(tmp_path / "metrics.jsonl")

    def broken(*args, **kwargs):
        raise RuntimeError("renderer exploded")

    monkeypatch.setattr(plots, "_png", broken)
    with caplog.at_level(logging.WARNING, logger="app.metrics.plots"):
        assert plots.save_training_curves(tmp_path) is None
    assert "renderer exploded" in caplog.text
