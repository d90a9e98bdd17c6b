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
    from app.train import train

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


# --- what each task's card says ------------------------------------------------------------------------------------
TASK_CARDS = {  # task -> (pipeline tag, the start of its "Task" section)
    "nli_cot": ("text-generation", "Natural language inference with chain-of-thought"),
    "confidence_tokens": ("text-generation", "Answers followed by a confidence token"),
    "confidence_head": ("text-classification", "A score head on the hidden state of a `<CONFIDENCE>` token"),
    "ranking": ("text-classification", "FinQA candidate ranking"),
}


@pytest.mark.parametrize("task", sorted(TASK_CARDS))
@pytest.mark.parametrize("adapter", [True, False])
def test_fine_tuned_tasks_cards_say_what_their_task_does(task, adapter, tmp_path):
    from huggingface_hub import ModelCard

    from app.config import make_config
    from app.modelcard import write_model_card

    cfg = make_config(task=task, model_name="org/base", out_dir=str(tmp_path / "run"), train_file="data/t.csv",
                      dev_file="data/d.csv")
    if adapter:
        (tmp_path / "adapter_config.json").write_text("{}")
    card = ModelCard.load(write_model_card(tmp_path, cfg, "final", 3))
    tag, summary = TASK_CARDS[task]
    assert card.data.pipeline_tag == tag and card.data.base_model == "org/base" and card.data.datasets == ["t.csv"]
    assert card.data.library_name == ("peft" if adapter else "transformers")
    assert f"## Task\n\n{summary}" in card.text
    assert f"fine-tuned from `org/base` ({'LoRA adapter' if adapter else 'full model'})" in card.text
    assert "AutoModelForCausalLM.from_pretrained(" in card.text and ("PeftModel" in card.text) == adapter
    assert "- train: `data/t.csv`\n- dev: `data/d.csv`\n" in card.text and "| `lora_r` |" in card.text
    binary = "- Binary labels only (NLI: entailment or not)" in card.text
    assert binary == (task == "nli_cot") and "Inherits the biases and license terms of the base model" in card.text


@pytest.fixture(scope="module")
def lookahead_run(tmp_path_factory) -> Path:
    from app.config import load_config
    from app.train import train

    out = tmp_path_factory.mktemp("lookahead_card") / "run"
    cfg = load_config(ROOT / "configs/lookahead_tiny.py", [
        "--corpus_chars=20000", "--context_length=16", "--max_seq_length=18", "--n_layer=1", "--n_head=2",
        "--d_model=16", "--batch_size=8", "--micro_batch_size=8", "--max_steps=4", "--eval_every=4",
        "--save_every=100", "--log_every=2", "--eval_rows=8", f"--out_dir={out}"])
    assert train(cfg) == 0
    return out


def test_lookahead_card_describes_a_model_trained_from_scratch(lookahead_run):
    """No base model, a text-generation model trained from scratch, its own recipe, and load code that loads it."""
    from huggingface_hub import ModelCard

    final = lookahead_run / "checkpoints" / "final"
    card = ModelCard.load(final / "README.md")
    assert card.data.pipeline_tag == "text-generation" and card.data.base_model is None
    assert card.data.library_name is None and "from-scratch" in card.data.tags
    assert card.data.datasets == ["shakespeare.txt"]
    text = card.text
    assert "fine-tuned" not in text and "from-scratch`" not in text and "AutoModelForCausalLM" not in text
    assert "a ConfidenceAwareGPT (n_layer 1, d_model 16, context 16 bytes), trained from scratch" in text
    assert "Character-level language model (ConfidenceAwareGPT" in text
    assert "| `d_model` | `16` |" in text and "| `lora_r` |" not in text and "- corpus: `" in text
    logged = read_metrics(lookahead_run)
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == pytest.approx(
        {k[5:]: v for k, v in logged[4].items() if k.startswith("eval/")})


def test_lookahead_card_load_code_loads_the_checkpoint(lookahead_run):
    import re

    import torch
    from safetensors.torch import load_file

    final = lookahead_run / "checkpoints" / "final"
    code = re.search(r"## How to load\n.*?```python\n(.*?)```", (final / "README.md").read_text(), re.S).group(1)
    scope: dict = {}
    exec(code.replace('"CHECKPOINT"', repr(str(final))), scope)
    saved = load_file(str(final / "model.safetensors"))
    loaded = scope["model"].state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert scope["tokenizer"]("To be").input_ids == list(b"To be")  # byte-level: one token per byte
