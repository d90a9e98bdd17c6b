"""Checkpoint integrity: manifest, one-line errors for broken files, resume fallback, torn metrics, no pickle."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from app import checkpoint as ckpt
from app.train import train
from app.engine.runlog import RunLog
from app.engine.verify import verify_command, verify_run
from app.errors import UserError
from app.lm.modeling import load_base_model, load_for_inference
from conftest import ROOT, read_metrics, run_app, tiny_args, tiny_config

# LoRA with dropout (the RNG state matters), a checkpoint every 2 steps: step_0000002, step_0000004, final
RUN = dict(finetuning="lora", lora_dropout=0.1, learning_rate=1e-2, max_steps=6, batch_size=4, micro_batch_size=4,
           save_every=2, keep_last=3, warmup_steps=2)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory) -> Path:
    """An uninterrupted LoRA run: the reference for resumes and the source of LoRA checkpoints to break."""
    out = tmp_path_factory.mktemp("lora") / "run"
    assert train(tiny_config(tiny_model_dir, out, **RUN)) == 0
    return out


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tmp_path_factory) -> Path:
    """One step of full fine-tuning: a checkpoint with model.safetensors + config.json."""
    out = tmp_path_factory.mktemp("full") / "run"
    assert train(tiny_config(tiny_model_dir, out, finetuning="full", max_steps=1, batch_size=4, micro_batch_size=4,
                             save_every=1000)) == 0
    return out


def final(run: Path) -> Path:
    return run / "checkpoints" / "final"


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def corrupt(path: Path, how: str) -> None:
    if how == "zero":
        path.write_bytes(b"")
    elif how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_text("{not json", encoding="utf-8")
    else:
        raise ValueError(how)


def problem(path: Path, **kwargs) -> str:
    """The one-line message of verify_checkpoint's UserError."""
    with pytest.raises(UserError) as err:
        ckpt.verify_checkpoint(path, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


def lora_cfg(tiny_model_dir, tmp_path):
    return tiny_config(tiny_model_dir, tmp_path / "unused", finetuning="lora")


# --- manifest -------------------------------------------------------------------------------------------------
def test_manifest_lists_every_file_with_size_and_sha256(lora_run):
    for directory in (lora_run / "checkpoints").iterdir():
        files = ckpt.read_json(directory / "manifest.json")["files"]
        on_disk = {p.name for p in directory.iterdir()} - {"manifest.json"}
        assert set(files) == on_disk and {"adapter_model.safetensors", "optimizer.safetensors",
                                          "trainer_state.json", "tokenizer.json"} <= on_disk
        for name, entry in files.items():
            assert entry == {"size": (directory / name).stat().st_size, "sha256": ckpt.sha256_file(directory / name)}
        ckpt.verify_checkpoint(directory)
    assert [p.name for p, err in verify_run(lora_run) if err is None] == ["final", "step_0000002", "step_0000004"]


def test_manifest_recurses_into_subfolders_and_is_written_by_publish(tmp_path):
    tmp = tmp_path / "checkpoints" / ".tmp-step_0000001"
    (tmp / "head").mkdir(parents=True)
    (tmp / "head" / "weights.bin").write_bytes(b"1234")
    (tmp / "trainer_state.json").write_text('{"step": 1}')
    ckpt.publish(tmp, tmp_path / "checkpoints" / "step_0000001")
    files = ckpt.read_json(tmp_path / "checkpoints" / "step_0000001" / "manifest.json")["files"]
    assert sorted(files) == ["head/weights.bin", "trainer_state.json"]
    assert files["head/weights.bin"]["size"] == 4


# --- one line naming the file ---------------------------------------------------------------------------------
@pytest.mark.parametrize("with_manifest", [True, False], ids=["manifest", "no-manifest"])
@pytest.mark.parametrize("kind,name,how", [
    ("lora", "adapter_model.safetensors", "truncate"),
    ("lora", "adapter_model.safetensors", "zero"),
    ("lora", "optimizer.safetensors", "truncate"),
    ("lora", "optimizer.safetensors", "zero"),
    ("lora", "trainer_state.json", "garbage"),
    ("full", "model.safetensors", "truncate"),
    ("full", "model.safetensors", "zero"),
])
def test_broken_file_is_named(lora_run, full_run, tmp_path, kind, name, how, with_manifest):
    directory = copy(final(lora_run if kind == "lora" else full_run), tmp_path / "ck")
    if not with_manifest:  # a checkpoint written before manifests: the cheap checks still find it
        (directory / "manifest.json").unlink()
        ckpt.verify_checkpoint(directory)
    corrupt(directory / name, how)
    message = problem(directory)
    assert message.startswith(f"{directory / name}: ")
    assert ("manifest.json says" in message) == with_manifest
    assert "corrupt checkpoint" in message


def test_same_size_corruption_is_found_by_the_checksum(lora_run, tmp_path):
    directory = copy(final(lora_run), tmp_path / "ck")
    path = directory / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # inside the tensor data: the header still reads
    path.write_bytes(bytes(data))
    ckpt.verify_checkpoint(directory, hashes=False)
    assert problem(directory) == f"{path}: sha256 differs from manifest.json (corrupt checkpoint)"


def test_missing_tokenizer_files(lora_run, tiny_model_dir, tmp_path):
    directory = copy(final(lora_run), tmp_path / "ck")
    (directory / "tokenizer.json").unlink()
    assert problem(directory).startswith(f"{directory / 'tokenizer.json'}: missing, listed in manifest.json")
    with pytest.raises(UserError, match="tokenizer.json: missing"):
        load_for_inference(directory, lora_cfg(tiny_model_dir, tmp_path), CPU)
    (directory / "tokenizer_config.json").unlink()
    (directory / "manifest.json").unlink()
    assert problem(directory) == f"{directory}: no tokenizer files (tokenizer.json or tokenizer_config.json)"


def test_load_for_inference_names_a_truncated_file(lora_run, full_run, tiny_model_dir, tmp_path):
    lora = copy(final(lora_run), tmp_path / "lora")
    corrupt(lora / "adapter_model.safetensors", "truncate")
    with pytest.raises(UserError, match=r"adapter_model\.safetensors: size \d+, manifest.json says"):
        load_for_inference(lora, lora_cfg(tiny_model_dir, tmp_path), CPU)
    full = copy(final(full_run), tmp_path / "full")
    corrupt(full / "model.safetensors", "zero")
    (full / "manifest.json").unlink()
    with pytest.raises(UserError, match=r"model\.safetensors: unreadable safetensors file"):
        load_for_inference(full, tiny_config(tiny_model_dir, tmp_path / "unused"), CPU)


# --- resume ---------------------------------------------------------------------------------------------------
def test_resume_falls_back_past_a_corrupt_newest_checkpoint(tiny_model_dir, tmp_path, lora_run, caplog):
    out = tmp_path / "run"
    assert train(tiny_config(tiny_model_dir, out, **RUN, stop_after_steps=4)) == 0
    newest = out / "checkpoints" / ckpt.step_name(4)
    corrupt(newest / "adapter_model.safetensors", "truncate")
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 5, "loss": 0.12')  # killed while writing a line
    assert ckpt.latest(out).name == ckpt.step_name(2)
    caplog.clear()
    assert train(tiny_config(tiny_model_dir, out, **RUN)) == 0
    warnings = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(warnings) == 1 and "step_0000004" in warnings[0] and "adapter_model.safetensors" in warnings[0]

    got = load_file(str(final(out) / "adapter_model.safetensors"))
    want = load_file(str(final(lora_run) / "adapter_model.safetensors"))
    assert set(got) == set(want)
    assert max((got[k] - want[k]).abs().max().item() for k in got) <= 1e-6
    got_m, want_m = read_metrics(out), read_metrics(lora_run)
    assert sorted(got_m) == sorted(want_m) == list(range(1, RUN["max_steps"] + 1))
    assert [got_m[s]["loss"] for s in sorted(got_m)] == pytest.approx([want_m[s]["loss"] for s in sorted(want_m)],
                                                                      abs=1e-6)
    ckpt.verify_checkpoint(newest)  # written again on the way


def test_all_checkpoints_broken_stops_with_one_line(tiny_model_dir, tmp_path, lora_run):
    out = copy(lora_run, tmp_path / "run")
    corrupt(out / "checkpoints" / "final" / "trainer_state.json", "garbage")
    corrupt(out / "checkpoints" / ckpt.step_name(4) / "optimizer.safetensors", "zero")
    (out / "checkpoints" / ckpt.step_name(2) / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="none of the 3 checkpoint"):
        ckpt.latest(out)
    result = run_app("train", "configs/tiny.py", *tiny_args(tiny_model_dir, out, **RUN))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {out / 'checkpoints'}: none of the 3 checkpoint(s) passes verification, "
                                f"the newest: {out / 'checkpoints' / 'final' / 'trainer_state.json'}: ")
    assert "--resume=fresh" in lines[-1]
    assert sum("skipping checkpoint" in ln for ln in lines) == 3


def test_torn_metrics_line_is_dropped_on_resume(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path / "run")
    cfg.out_path.mkdir(parents=True)
    path = cfg.out_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    log = RunLog(cfg, resume_step=2, enabled=True)
    log.write(3, {"loss": 0.5})
    log.close()
    assert [json.loads(ln)["step"] for ln in path.read_text().splitlines()] == [1, 2, 3]


# --- safetensors only -----------------------------------------------------------------------------------------
def pickle_only_model(tiny_model_dir: Path, directory: Path) -> Path:
    """config.json, tokenizer and a real pytorch_model.bin of the tiny model, no safetensors."""
    directory.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, directory / name)
    torch.save(load_file(str(tiny_model_dir / "model.safetensors")), directory / "pytorch_model.bin")
    return directory


def refuse_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def test_pickle_only_directory_is_one_line_error(tiny_model_dir, tmp_path, monkeypatch):
    directory = pickle_only_model(tiny_model_dir, tmp_path / "bin")
    refuse_unpickling(monkeypatch)
    message = problem(directory)
    assert message.startswith(f"{directory / 'pytorch_model.bin'}: pickle weights are never loaded")
    assert "save_pretrained(DIR, safe_serialization=True)" in message
    cfg = tiny_config(tiny_model_dir, tmp_path / "unused")
    loads = (lambda: load_base_model(cfg, CPU, path=str(directory)), lambda: load_for_inference(directory, cfg, CPU))
    for load in loads:
        with pytest.raises(UserError) as err:
            load()
        assert str(err.value) == message
    # past that check, transformers itself is told safetensors only (use_safetensors=True)
    monkeypatch.setattr(ckpt, "require_safetensors", lambda path: None)
    with pytest.raises(UserError, match="no file named model.safetensors"):
        load_base_model(cfg, CPU, path=str(directory))


def test_pickle_only_adapter_is_one_line_error(lora_run, tiny_model_dir, tmp_path):
    directory = copy(final(lora_run), tmp_path / "ck")
    weights = directory / "adapter_model.safetensors"
    torch.save(load_file(str(weights)), directory / "adapter_model.bin")
    weights.unlink()
    (directory / "manifest.json").unlink()
    message = problem(directory)
    assert message.startswith(f"{directory / 'adapter_model.bin'}: pickle weights are never loaded")
    assert "PeftModel.from_pretrained" in message
    with pytest.raises(UserError, match="adapter_model.bin: pickle weights"):
        load_for_inference(directory, lora_cfg(tiny_model_dir, tmp_path), CPU)


def test_inference_load_never_opens_a_pickle(lora_run, full_run, tiny_model_dir, tmp_path, monkeypatch):
    """Decoy pickle weights beside the safetensors ones: loading reads the safetensors and never unpickles."""
    lora = copy(final(lora_run), tmp_path / "lora")
    torch.save({}, lora / "adapter_model.bin")
    full = copy(final(full_run), tmp_path / "full")
    torch.save({}, full / "pytorch_model.bin")
    refuse_unpickling(monkeypatch)

    model, _ = load_for_inference(lora, lora_cfg(tiny_model_dir, tmp_path), CPU)
    saved = load_file(str(lora / "adapter_model.safetensors"))
    state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(state) == len(saved) > 0
    assert all(torch.equal(state[k.replace(".weight", ".default.weight")], v) for k, v in saved.items())

    model, _ = load_for_inference(full, tiny_config(tiny_model_dir, tmp_path / "unused"), CPU)
    saved = load_file(str(full / "model.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())


# --- the verify command ---------------------------------------------------------------------------------------
def test_verify_command_one_line_per_checkpoint(lora_run, tmp_path):
    out = copy(lora_run, tmp_path / "run")
    root = out / "checkpoints"
    (root / ".tmp-step_0000006").mkdir()  # a killed writer's leftover: not a checkpoint
    (root / ckpt.step_name(2) / "manifest.json").unlink()
    corrupt(root / ckpt.step_name(4) / "optimizer.safetensors", "truncate")

    results = verify_run(out)
    assert [(p.name, err is None) for p, err in results] == [("final", True), ("step_0000002", True),
                                                            ("step_0000004", False)]
    runner = CliRunner()
    result = runner.invoke(verify_command, [str(out)])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines() == [
        f"{root / 'final'}: ok",
        f"{root / 'step_0000002'}: ok (no manifest.json: written before manifests, checksums not checked)",
        f"error: {results[2][1]}",
    ]
    assert results[2][1].startswith(f"{root / 'step_0000004' / 'optimizer.safetensors'}: size ")

    result = runner.invoke(verify_command, [str(root / "final")])
    assert (result.exit_code, result.output) == (0, f"{root / 'final'}: ok\n")
    assert runner.invoke(verify_command, [str(tmp_path / "nowhere")]).exit_code == 2
    help_ = runner.invoke(verify_command, ["--help"])
    assert help_.exit_code == 0 and "manifest.json" in help_.output


# --- infer (wired by the infer command) -----------------------------------------------------------------------
def test_infer_on_a_broken_checkpoint_is_one_line_exit_2(full_run, tmp_path):
    directory = copy(final(full_run), tmp_path / "ck")
    corrupt(directory / "model.safetensors", "truncate")
    result = run_app("infer", "data/sample/test.csv", "--checkpoint", str(directory),
                     "--output", str(tmp_path / "predictions.csv"), cwd=ROOT)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(directory / "model.safetensors") in lines[0], result.stderr
