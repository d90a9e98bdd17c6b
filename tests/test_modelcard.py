"""The model card of final/ and best*/ checkpoints: Hugging Face front matter (parsed by huggingface_hub), metrics equal
to the checkpoint's evaluation, in the manifest, pushed with the Hub push."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import pytest

from conftest import ROOT, read_metrics, tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir) -> Path:
    from app.engine.loop import train

    out = tmp_path_factory.mktemp("card") / "cardrun"
    cfg = tiny_config(tiny_model_dir, out, finetuning="lora", lora_r=4, lora_alpha=8, max_steps=4, batch_size=4,
                      micro_batch_size=4, save_every=2, eval_every=2, dev_file=str(ROOT / "data/sample/dev.csv"),
                      eval_rows=4, eval_batch_size=4, max_new_tokens=4, license="mit")
    assert train(cfg) == 0
    return out


def test_final_and_best_cards_parse_and_hold_their_metrics(run):
    from huggingface_hub import ModelCard

    ckpts = run / "checkpoints"
    with_card = sorted(p.name for p in ckpts.iterdir() if p.name == "final" or p.name.startswith("best"))
    assert "final" in with_card and any(n.startswith("best") for n in with_card)
    logged = read_metrics(run)
    for name in with_card:
        card = ModelCard.load(ckpts / name / "README.md")
        data = card.data
        step = json.loads((ckpts / name / "trainer_state.json").read_text())["step"]
        assert data.base_model == json.loads((ckpts / name / "run_config.json").read_text())["model_name"]
        assert data.library_name == "peft" and data.license == "mit" and data.pipeline_tag == "text-generation"
        assert "nli_cot" in data.tags and data.datasets == ["train.csv"]
        expected = {k[5:]: v for k, v in logged[step].items() if k.startswith("eval/")}
        assert expected, f"no evaluation at step {step}"
        got = {r.metric_type: r.metric_value for r in data.eval_results}
        assert got == pytest.approx(expected)
        assert all(r.dataset_name == "dev.csv" and r.task_type == "text-generation" for r in data.eval_results)
        for section in ("## Task", "## Prompt format", "## Training data", "## Recipe", "## Metrics", "## How to load",
                        "## Limitations"):
            assert section in card.text
        assert "| `lora_r` | `4` |" in card.text
        manifest = json.loads((ckpts / name / "manifest.json").read_text())
        assert "README.md" in json.dumps(manifest)  # written before publish: covered by the manifest


def test_step_checkpoints_have_no_card_of_ours(run):
    for p in (run / "checkpoints").iterdir():
        if p.name.startswith("step_") and (p / "README.md").is_file():
            assert "finetune-runner" not in (p / "README.md").read_text()  # peft's own stub at most


def test_verify_passes_with_the_card(run):
    from app.cli import main

    assert main(["verify", str(run)]) == 0


def test_hub_push_uploads_the_card():
    from app.tasks.confidence_tokens.hub import HUB_FILES

    assert any(fnmatch.fnmatch("README.md", pat) for pat in HUB_FILES)


def test_card_without_metrics_is_still_valid(tmp_path, tiny_model_dir):
    from huggingface_hub import ModelCard

    from app.modelcard import write_model_card

    cfg = tiny_config(tiny_model_dir, tmp_path / "none")
    path = write_model_card(tmp_path, cfg, "final", 7)
    card = ModelCard.load(path)
    assert card.data.library_name == "transformers" and card.data.license == "apache-2.0"
    assert card.data.eval_results is None and "No evaluation at this step" in card.text
