"""Outputs honour the umask: every file and folder the writers leave gets the mode a plain `open(path, "w")` or
`mkdir` gives under the same umask (0644/0755 under 022, 0664/0775 under 002, 0600/0700 under 077), so results in a
shared folder, or on a volume read by a container running as another user, are readable like any other file.

Each writer runs under each umask (set with os.umask, restored after); one case trains a tiny model for two steps and
then runs infer, score and export on its checkpoint, and checks every file and folder they leave."""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
from pathlib import Path

import pytest

from conftest import ROOT, tiny_config

from app.__main__ import main

UMASKS = [0o022, 0o002, 0o077]


@pytest.fixture(params=UMASKS, ids=lambda m: f"umask{m:03o}")
def umask(request):
    before = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(before)


def open_modes(scratch: Path) -> tuple[int, int]:
    """(file mode, folder mode) that `open(path, "w")` and `mkdir` give under the current umask."""
    scratch.mkdir()
    probe = scratch / "probe"
    with open(probe, "w"):
        pass
    return stat.S_IMODE(probe.stat().st_mode), stat.S_IMODE(scratch.stat().st_mode)


def modes_under(paths: list[Path]) -> dict[str, str]:
    """'mode' of every path given and, for a folder, of everything inside it."""
    found = {}
    for path in paths:
        for p in [path, *(sorted(path.rglob("*")) if path.is_dir() else [])]:
            found[str(p)] = f"{stat.S_IMODE(p.lstat().st_mode):04o}"
    return found


def assert_open_modes(paths: list[Path], scratch: Path) -> None:
    file_mode, dir_mode = open_modes(scratch)
    got = modes_under(paths)
    expected = {p: f"{dir_mode if Path(p).is_dir() else file_mode:04o}" for p in got}
    assert got == expected
    assert len(got) >= len(paths)


def quiet(argv: list[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(argv)


# --- the writers, each given an empty folder, returning what it wrote ----------------------------------------------
def write_atomic_text(d: Path) -> list[Path]:
    from app.atomic import write_atomic

    return [write_atomic(d / "predictions.csv", "id,predicted_label\na,1\n")]


def write_atomic_over_an_old_file(d: Path) -> list[Path]:
    from app.atomic import write_atomic

    (d / "old.txt").write_text("old\n")
    return [write_atomic(d / "old.txt", "new\n")]


def write_json(d: Path) -> list[Path]:
    from app.atomic import write_json_atomic

    return [write_json_atomic(d / "sub" / "metrics.json", {"accuracy": 0.5})]


def temp_file(d: Path) -> list[Path]:
    from app.atomic import create_temp_file

    fd, path = create_temp_file(d, prefix=".x.")
    os.close(fd)
    return [path]


def safetensors_folder_given_new_modes(d: Path) -> list[Path]:
    """What a library writes in its own way (safetensors' save_file: 0600), then give_new_modes, as a checkpoint's
    publish does."""
    import numpy as np
    from safetensors.numpy import save_file

    from app.atomic import give_new_modes

    (d / "folder" / "sub").mkdir(parents=True, mode=0o700)
    save_file({"w": np.zeros(2, dtype=np.float32)}, str(d / "folder" / "sub" / "w.safetensors"))
    give_new_modes(d / "folder")
    return [d / "folder"]


def reliability_json_and_png(d: Path) -> list[Path]:
    from app.metrics.calibration import reliability_data, save_reliability_json
    from app.metrics.plots import save_reliability_png

    data = reliability_data([0.9, 0.2, 0.7, 0.4], [1, 0, 0, 1], n_bins=4)
    return [save_reliability_json(data, d / "reliability.json"), save_reliability_png(data, d / "reliability.png")]


def trimmed_metrics_log(d: Path) -> list[Path]:
    from app.engine.runlog import trim_metrics

    path = d / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    trim_metrics(path, 1)
    return [path]


def token_cache_entry(d: Path) -> list[Path]:
    import numpy as np

    from app.engine.token_cache import save

    arrays = {"input_ids": np.arange(4, dtype=np.int64), "labels": np.arange(4, dtype=np.int64),
              "offsets": np.array([0, 4], dtype=np.int64), "lines": np.array([2], dtype=np.int64)}
    save(d / "entry", arrays, [{}], {"key": "k"})
    return [d / "entry"]


def tiny_model(d: Path) -> list[Path]:
    assert quiet(["tiny-model", str(d / "model")]) == 0
    return [d / "model"]


def steps_convert_and_synthetic(d: Path) -> list[Path]:
    assert quiet(["steps", "synthetic", str(d / "synthetic")]) == 0
    assert quiet(["steps", "convert", str(d / "synthetic" / "dev.jsonl"), str(d / "converted.jsonl")]) == 0
    return [d / "synthetic", d / "converted.jsonl"]


def ranking_prepare(d: Path) -> list[Path]:
    record = {"id": "r1", "pre_text": ["Sales rose."], "post_text": [], "table": [["", "2019"], ["sales", "$ 5"]],
              "qa": {"question": "What is twice the sales?", "program": "multiply(5, const_2)", "exe_ans": 10.0}}
    (d / "finqa.json").write_text(json.dumps([record]))
    assert quiet(["ranking", "prepare", str(d / "finqa.json"), str(d / "out" / "prepared.jsonl")]) == 0
    return [d / "out"]


def cot_generate(d: Path) -> list[Path]:
    pytest.importorskip("openai")
    from cot_server import ScriptedServer

    src = d / "in.csv"
    src.write_text("premise,hypothesis,label\nIn the museum Ann reads.,Ann is indoors.,1\n")
    with ScriptedServer(api_key="sk-modes") as server:
        os.environ["COT_MODES_KEY"] = "sk-modes"
        try:
            code = quiet(["cot", "generate", str(src), "--output", str(d / "out" / "gen.csv"),
                          f"--base_url={server.base_url}", "--api_key_env=COT_MODES_KEY", "--progress=False"])
        finally:
            del os.environ["COT_MODES_KEY"]
    assert code == 0
    return [d / "out"]


WRITERS = [write_atomic_text, write_atomic_over_an_old_file, write_json, temp_file, safetensors_folder_given_new_modes,
           reliability_json_and_png, trimmed_metrics_log, token_cache_entry, tiny_model, steps_convert_and_synthetic,
           ranking_prepare, cot_generate]


@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.__name__)
def test_a_writer_gives_the_modes_open_gives(writer, umask, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    written = writer(out)
    assert written and all(p.exists() for p in written)
    assert_open_modes(written, tmp_path / "scratch")


def test_a_training_run_and_what_reads_its_checkpoint_give_the_modes_open_gives(umask, tiny_model_dir, tmp_path):
    """Checkpoints (a step one and final), metrics.jsonl, the token cache, the training curves; infer's
    predictions.csv, .solution and metrics JSON; score's JSON; an exported model."""
    from app.train import train

    run = tmp_path / "run"
    cfg = tiny_config(tiny_model_dir, run, max_steps=2, batch_size=4, micro_batch_size=4, save_every=1,
                      dev_file=str(ROOT / "data/sample/dev.csv"), eval_every=2, eval_rows=4, max_new_tokens=4)
    assert train(cfg) == 0
    final = run / "checkpoints" / "final"
    assert (final / "trainer_state.json").is_file() and list((run / "checkpoints").glob("step_*"))
    rows = (ROOT / "data/sample/test.csv").read_text().splitlines()[:5]
    (tmp_path / "rows.csv").write_text("\n".join(rows) + "\n")
    preds = tmp_path / "preds" / "predictions.csv"
    assert quiet(["infer", str(tmp_path / "rows.csv"), "--checkpoint", str(final), "--output", str(preds),
                  "--max_new_tokens=4"]) == 0
    assert quiet(["score", "--pred", str(preds), "--gold", str(tmp_path / "rows.csv"),
                  "--json", str(tmp_path / "preds" / "score.json")]) == 0
    assert quiet(["export", str(final), "--output", str(tmp_path / "exported")]) == 0
    written = [run, tmp_path / "preds", tmp_path / "exported"]
    names = set(modes_under(written))
    for expected in ("metrics.jsonl", "checkpoints/final/manifest.json", "checkpoints/final/trainer_state.json",
                     "token_cache", "training_curves.png", "preds/predictions.csv", "preds/predictions.solution",
                     "preds/predictions.metrics.json", "preds/score.json", "exported/config.json"):
        assert any(n.endswith(expected) for n in names), expected
    assert_open_modes(written, tmp_path / "scratch")
