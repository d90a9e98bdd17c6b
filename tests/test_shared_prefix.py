"""A prompt prefix common to a batch is computed once: same loss and gradients as the full forward."""

from __future__ import annotations

import pytest
import torch

from app.lm.forward import MIN_SHARED_PREFIX, CompletionLoss, shared_prefix_length
from app.tasks.nli_cot.task import NliCot
from app.engine.loop import train
from conftest import ROOT, read_metrics, tiny_config


def test_shared_prefix_length_stops_before_any_loss_and_any_row_end():
    p = list(range(100, 130))  # 30 common tokens
    ids = [p + [1, 2, 3, 4], p + [1, 2, 9], p + [1, 2, 3]]
    labels = [[-100] * 33 + [4], [-100] * 32 + [9], [-100] * 32 + [3]]
    # the common run is 32 tokens; the second and third rows' first target (position 32) is predicted from
    # position 31, which must stay outside the shared part
    assert shared_prefix_length(ids, labels) == 31
    assert shared_prefix_length(ids[:1], labels[:1]) == 0  # one row: nothing to share
    cut = 31 - (MIN_SHARED_PREFIX - 1)  # leaves a shareable run one token short of the minimum
    assert shared_prefix_length([x[cut:] for x in ids], [lab[cut:] for lab in labels]) == 0  # too short to pay
    assert shared_prefix_length([p + [1], p + [2]], [[-100] * 30 + [1], [-100] * 30 + [2]]) == 29


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    cfg = tiny_config(tiny_model_dir, tmp_path_factory.mktemp("sp"), finetuning="lora", lora_dropout=0.0)
    task = NliCot()
    torch.manual_seed(0)
    model, tok = task.load_model(cfg, torch.device("cpu"))
    features = [task.encode(r, tok, cfg) for r in task.load_rows(cfg, "train")[:6]]
    return cfg, task, model, tok, features


def _loss_and_grads(objective, batch):
    objective.zero_grad()
    loss = objective(**batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in objective.named_parameters() if p.requires_grad}


def test_shared_prefix_gives_the_same_loss_and_gradients(setup):
    cfg, task, model, tok, features = setup
    batch = task.collate(features, tok.pad_token_id)
    assert batch["shared_prefix"] >= 40  # the default template's instruction, tokenized
    assert len({len(f.input_ids) for f in features}) > 1  # right padding is exercised too
    shared = _loss_and_grads(CompletionLoss(model, share_prefix=True).train(), batch)
    full = _loss_and_grads(CompletionLoss(model, share_prefix=False).train(), batch)
    assert shared[0] == pytest.approx(full[0].item(), rel=1e-5)
    assert shared[1].keys() == full[1].keys() and shared[1]
    for name, grad in full[1].items():
        torch.testing.assert_close(shared[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_checkpointing_turns_sharing_off(setup):
    cfg, task, model, tok, features = setup
    from app.lm.forward import last_hidden_states_shared_prefix

    batch = task.collate(features, tok.pad_token_id)
    from app.lm.modeling import enable_activation_checkpointing

    enable_activation_checkpointing(model)
    try:
        assert last_hidden_states_shared_prefix(model, batch["input_ids"], batch["attention_mask"], 20) is None
    finally:
        model.activation_checkpointing_disable()


def test_training_with_and_without_sharing_match(tiny_model_dir, tmp_path):
    runs = {}
    for share in (True, False):
        out = tmp_path / f"share{share}"
        assert train(tiny_config(tiny_model_dir, out, finetuning="lora", share_prompt_prefix=share, max_steps=4,
                                 batch_size=8, micro_batch_size=4, lora_dropout=0.0, eval_every=4,
                                 eval_rows=8, max_new_tokens=8, dev_file=str(ROOT / "data/sample/dev.csv"))) == 0
        runs[share] = read_metrics(out)
    for step in range(1, 5):
        assert runs[True][step]["loss"] == pytest.approx(runs[False][step]["loss"], rel=1e-5)
        assert runs[True][step]["grad_norm"] == pytest.approx(runs[False][step]["grad_norm"], rel=1e-4)
    assert runs[True][4]["eval/dev_loss"] == pytest.approx(runs[False][4]["eval/dev_loss"], rel=1e-5)
