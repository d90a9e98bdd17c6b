"""The GPU verification kit (tests/gpu/check.sh) keeps running: its CPU smoke goes through every part end to end and
writes its JSON and table, and a missing package the project needs is one line naming it, not a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

CHECK = ROOT / "tests" / "gpu" / "check.sh"


def run_check(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(["bash", str(CHECK), *args], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_cpu_smoke_runs_every_part_and_writes_json_and_table(tmp_path):
    out = tmp_path / "out"
    proc = run_check("--cpu-smoke", "--out", str(out), timeout=3600)  # a hang guard: see SMOKE_PROFILE
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert res["ok"] and res["mode"] == "cpu-smoke"
    assert list(res["parts"]) == ["sanity", "train", "infer", "confidence", "resume"]
    assert {name: part["status"] for name, part in res["parts"].items()} == dict.fromkeys(res["parts"], "ok")
    assert res["checks"] and all(c["ok"] for c in res["checks"])

    sanity = res["parts"]["sanity"]["figures"]
    assert sanity["bf16_matmul"]["rel_error"] < 1e-2
    if "cuda_tests" in sanity and "summary" in sanity["cuda_tests"]:
        assert sanity["cuda_tests"]["passed"] == 0 and sanity["cuda_tests"]["skipped"] >= 1  # CPU: all skip

    train = res["parts"]["train"]
    for name in ("engine_lora_ckpt", "engine_lora_nockpt"):
        assert train["figures"][name]["tokens_per_s"] > 0 and train["figures"][name]["step_s"] > 0
    for name, why in train.get("skipped", {}).items():  # only a missing package may skip a setup
        assert why.endswith("not importable"), (name, why)
        assert f"{name} skipped: {why}" in train["notes"]

    infer = res["parts"]["infer"]["figures"]
    assert infer["fp32"]["equal_rows"] == infer["fp32"]["rows"] > 0
    assert min(infer["rows_per_s"].values()) > 0
    confidence = res["parts"]["confidence"]["figures"]
    assert set(confidence) == {"vocab_32k", "vocab_152k"}
    resume = res["parts"]["resume"]["figures"]
    assert resume["resumed"] and resume["resumed_vs_reference"]["weights_rel_l2"] <= 1e-5
    assert resume["repeat_vs_reference"]["weights_rel_l2"] <= 1e-5

    table = (out / "table.txt").read_text()
    assert table.splitlines()[0].endswith("PASS") and "engine_lora_ckpt" in table and "vocab_152k" in table
    assert table in proc.stdout


def test_missing_project_package_is_one_line_naming_it(tmp_path):
    shadow = tmp_path / "site" / "pydantic"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('pydantic is shadowed by the test')\n")
    proc = run_check(env={"PYTHONPATH": str(tmp_path / "site")}, timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "pydantic" in lines[0] and "pip install" in lines[0] and "click" not in lines[0]
    assert proc.stdout == ""
