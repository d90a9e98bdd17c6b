"""Data sources: CSV, JSONL, JSON, Parquet, save_to_disk directories and Hub ids (from a local Hugging Face cache
built here, offline) through the NLI and confidence-head tasks; errors; the download command; data_sources.json."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from app.config import make_config
from app.errors import UserError
from app.tasks import get_task
from conftest import ROOT, run_app, tiny_config

datasets = pytest.importorskip("datasets")
SHA = "0123456789abcdef0123456789abcdef01234567"


def nli_rows(n=24):
    return [{"premise": f"In the garden, P{i} waits.", "hypothesis": f"P{i} is {'outdoors' if i % 3 else 'indoors'}.",
             "label": int(i % 3 != 0), "thought_process": "The garden is outdoors."} for i in range(n)]


def step_rows(n=12):
    return [{"problem": f"Where is P{i}?", "steps": [f"P{i} is in the garden.", "So outdoors."],
             "labels": [1.0, float(i % 2)]} for i in range(n)]


def write_hub_dataset(cache: Path, repo: str, splits: dict[str, list[dict]]) -> Path:
    """A dataset repository as the Hugging Face cache holds it after a download: refs/main -> a snapshot."""
    base = cache / f"datasets--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(SHA)
    snap = base / "snapshots" / SHA / "data"
    snap.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        datasets.Dataset.from_list(rows).to_parquet(str(snap / f"{split}.parquet"))
    return snap.parent


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    write_hub_dataset(cache, "org/nli", {"train": nli_rows(), "validation": nli_rows(6)})
    write_hub_dataset(cache, "org/steps", {"train": step_rows()})
    return cache


def write_sources(tmp_path: Path, rows: list[dict], name: str) -> dict[str, str]:
    """The same rows as CSV (NLI only), JSONL, JSON, Parquet and a save_to_disk directory."""
    out = {}
    if not any(isinstance(v, list) for v in rows[0].values()):
        path = tmp_path / f"{name}.csv"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        out["csv"] = str(path)
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / f"{name}.json").write_text(json.dumps(rows, indent=1))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / f"{name}.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / f"{name}_ds"))
    out.update(jsonl=str(tmp_path / f"{name}.jsonl"), json=str(tmp_path / f"{name}.json"),
               parquet=str(tmp_path / f"{name}.parquet"), save_to_disk=str(tmp_path / f"{name}_ds"))
    return out


def test_every_source_kind_gives_the_same_nli_rows(tmp_path, hub):
    sources = {**write_sources(tmp_path, nli_rows(), "nli"), "hub": "hf:org/nli", "hub_split": "hf:org/nli::train"}
    task = get_task("nli_cot")
    got = {}
    for kind, source in sources.items():
        rows = task.load_rows(make_config(train_file=source, dev_file=None), "train")
        got[kind] = [(r.values["premise"], r.values["hypothesis"], r.values["label"]) for r in rows]
    want = [(r["premise"], r["hypothesis"], r["label"]) for r in nli_rows()]
    assert all(v == want for v in got.values()), {k: v[:2] for k, v in got.items()}
    dev = task.load_rows(make_config(dev_file="hf:org/nli:validation"), "dev")
    assert len(dev) == 6


def test_every_source_kind_gives_the_same_confidence_head_rows(tmp_path, hub):
    sources = {**write_sources(tmp_path, step_rows(), "steps"), "hub": "hf:org/steps"}
    task = get_task("confidence_head")
    got = {}
    for kind, source in sources.items():
        cfg = make_config(task="confidence_head", train_file=source, dev_file=None)
        got[kind] = [(r.values["problem"], list(r.values["steps"]), list(r.values["labels"]))
                     for r in task.load_rows(cfg, "train")]
    want = [(r["problem"], r["steps"], r["labels"]) for r in step_rows()]
    assert all(v == want for v in got.values())


def test_task_checks_run_on_every_source(tmp_path, hub):
    bad = nli_rows(5)
    bad[2]["label"] = 7
    srcs = write_sources(tmp_path, bad, "bad")
    task = get_task("nli_cot")
    lines = {"csv": 4, "jsonl": 3, "parquet": 3, "save_to_disk": 3}
    for kind, line in lines.items():
        with pytest.raises(UserError, match=rf"^{srcs[kind]}:{line}: label must be 0 or 1, found '?7'?$"):
            task.load_rows(make_config(train_file=srcs[kind]), "train")
    missing = [{k: v for k, v in r.items() if k != "hypothesis"} for r in nli_rows(3)]
    datasets.Dataset.from_list(missing).to_parquet(str(tmp_path / "missing.parquet"))
    with pytest.raises(UserError, match=r"missing.parquet: missing column\(s\) hypothesis \(columns found: premise"):
        task.load_rows(make_config(train_file=str(tmp_path / "missing.parquet")), "train")
    write_hub_dataset(hub, "org/missing", {"train": missing})
    with pytest.raises(UserError, match=r"^hf:org/missing: missing column\(s\) hypothesis"):
        task.load_rows(make_config(train_file="hf:org/missing"), "train")


def test_csv_and_jsonl_errors_keep_file_and_line(tmp_path):
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("premise,hypothesis,label\na,b,1\nc,d\n")
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"premise": "a", "hypothesis": "b", "label": 1}\n{"premise": \n')
    task = get_task("nli_cot")
    with pytest.raises(UserError, match=rf"^{csv_path}:3: expected 3 fields"):
        task.load_rows(make_config(train_file=str(csv_path)), "train")
    with pytest.raises(UserError, match=rf"^{jsonl}:2: broken JSON line"):
        task.load_rows(make_config(train_file=str(jsonl)), "train")


def test_hub_errors_are_one_line(hub):
    task = get_task("nli_cot")
    with pytest.raises(UserError) as err:
        task.load_rows(make_config(train_file="hf:org/absent"), "train")
    message = str(err.value)
    assert "\n" not in message and "hf:org/absent" in message and "HF_HUB_OFFLINE=1" in message
    assert "python -m app download data org/absent" in message
    with pytest.raises(UserError, match=r"^hf:org/nli::nope: no split 'nope' \(splits: train, validation\)$"):
        task.load_rows(make_config(train_file="hf:org/nli::nope"), "train")
    with pytest.raises(UserError, match="not a Hub dataset id"):
        task.load_rows(make_config(train_file="hf:a/b/c"), "train")


def test_hub_id_passes_config_validation():
    cfg = make_config(train_file="hf:org/nli@v1.0:default:train", dev_file="hf:org/nli::validation")
    assert cfg.train_file.startswith("hf:") and cfg.token_cache is True and cfg.token_cache_dir is None
    with pytest.raises(UserError):
        make_config(train_file="")


@pytest.mark.slow
def test_training_on_a_hub_dataset_records_its_sources(tiny_model_dir, tmp_path, hub):
    from app.train import train

    out = tmp_path / "run"
    cfg = tiny_config(tiny_model_dir, out, train_file="hf:org/nli", dev_file="hf:org/nli:validation", max_steps=2,
                      batch_size=4, micro_batch_size=4, eval_every=100, eval_rows=2, max_new_tokens=4)
    assert train(cfg) == 0
    recorded = json.loads((out / "data_sources.json").read_text())
    assert recorded[0] == {"field": "train_file", "source": "hf:org/nli", "kind": "hub", "id": "org/nli",
                           "revision": SHA, "config": None, "split": "train", "fingerprint": recorded[0]["fingerprint"]}
    assert recorded[1]["split"] == "validation" and recorded[1]["revision"] == SHA
    assert json.loads((out / "run_config.json").read_text())["train_file"] == "hf:org/nli"
    parquet = tmp_path / "test.parquet"
    datasets.Dataset.from_list(nli_rows(3)).to_parquet(str(parquet))
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub), "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}
    for source in (str(parquet), "hf:org/nli:validation"):
        pred = tmp_path / f"pred-{len(source)}.csv"
        result = run_app("infer", source, "--checkpoint", str(out), "--output", str(pred), "--max_new_tokens=4", env=env)
        assert result.returncode == 0, result.stderr
        assert len(pred.read_text().strip().splitlines()) == 1 + (3 if source == str(parquet) else 6)


def test_download_against_a_local_cache(tmp_path, hub, tiny_model_dir):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub), "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}
    result = run_app("download", "data", "org/nli", env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert str(hub / "datasets--org--nli" / "snapshots" / SHA) in result.stdout and "KiB" in result.stdout
    result = run_app("download", "data", "hf:org/nli", "--split", "validation", env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    result = run_app("download", "data", "org/absent", env=env, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "hf:org/absent" in result.stderr
    model = hub / "models--org--model"
    (model / "refs").mkdir(parents=True)
    (model / "refs" / "main").write_text(SHA)
    (model / "snapshots" / SHA).mkdir(parents=True)
    (model / "snapshots" / SHA / "config.json").write_text("{}")
    result = run_app("download", "model", "org/model", env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert str(model / "snapshots" / SHA) in result.stdout and "2 B" in result.stdout
    config = tmp_path / "c.py"
    config.write_text(f"base_config = {str(ROOT / 'configs/tiny.py')!r}\nmodel_name = 'org/model'\n"
                      "train_file = 'hf:org/nli'\ndev_file = 'hf:org/nli:validation'\ncreate_tiny_model = False\n")
    result = run_app("download", "--for", str(config), env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(SHA) >= 3 and "HF_HUB_OFFLINE=1" in result.stdout
    assert run_app("download", "--help").returncode == 0
