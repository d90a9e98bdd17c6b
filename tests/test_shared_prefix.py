"""A prompt prefix common to a batch is computed once: same loss and gradients as the full forward."""

from __future__ import annotations

import copy

import pytest
import torch

from app.lm.forward import MIN_SHARED_PREFIX, CompletionLoss, shared_prefix_length
from app.tasks.nli_cot.task import NliCot
from app.train import train
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
    model, tok = task.model_kind(cfg).load(cfg, torch.device("cpu"))
    features = [task.encode(r, tok, cfg) for r in task.load_rows(cfg, "train")[:6]]
    return cfg, task, model, tok, features


def _loss_and_grads(objective, batch):
    objective.zero_grad()
    loss = objective(**batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in objective.named_parameters() if p.requires_grad}


def _max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_shared_prefix_gives_the_same_loss_and_gradients(setup):
    cfg, task, model, tok, features = setup
    batch = task.collate(features, tok.pad_token_id)
    assert batch["shared_prefix"] >= 40  # the default template's instruction, tokenized
    assert len({len(f.input_ids) for f in features}) > 1  # right padding is exercised too
    shared = _loss_and_grads(CompletionLoss(model, share_prefix=True).train(), batch)
    full = _loss_and_grads(CompletionLoss(model, share_prefix=False).train(), batch)
    exact = _loss_and_grads(CompletionLoss(copy.deepcopy(model).double(), share_prefix=False).train(), batch)
    # The two float32 forwards round differently; the yardstick is float32's own rounding of the full forward,
    # measured here against float64 on this CPU's kernels. Measured (max |diff| over all gradients): shared vs full
    # 6.2e-6 / 5.3e-6, full vs float64 7.3e-6 / 6.8e-6 (AVX-512 / AVX2 kernels): a fixed elementwise rtol=1e-4,
    # atol=1e-6 was at 0.96 of its budget on AVX-512 (cancellation noise scales with the tensor, not the element).
    float32_floor = _max_abs_diff(full[1], exact[1])
    assert 0 < float32_floor < 1e-4  # float32 rounding, not a broken forward on either side
    assert _max_abs_diff(shared[1], full[1]) <= 4 * float32_floor
    # the loss: a float32 sum over the batch, measured bitwise equal on both kernel paths; 1e-5 is ~80 float32 eps
    assert shared[0] == pytest.approx(full[0].item(), rel=1e-5)


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
    # Two different float32 forwards, then Adam. Measured, AVX-512 / AVX2 kernels: loss 9.0e-8 / 0, grad norm
    # 6.0e-8 / 6.3e-8, dev loss 1.8e-9 / 0 (relative): the tolerances are 100x and 1000x those floors
    for step in range(1, 5):
        assert runs[True][step]["loss"] == pytest.approx(runs[False][step]["loss"], rel=1e-5)
        assert runs[True][step]["grad_norm"] == pytest.approx(runs[False][step]["grad_norm"], rel=1e-4)
    assert runs[True][4]["eval/dev_loss"] == pytest.approx(runs[False][4]["eval/dev_loss"], rel=1e-5)
