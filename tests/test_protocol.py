"""The task protocol's engine features, on real short runs of the tiny model: several named losses (logged and
weighted, normalised over the global batch), parameter groups of a model kind (and their resume), the evaluation
context and the end-of-run hook; what each task's model kind says."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from app import checkpoint as ckpt
from app.engine.batching import BatchPlan
from app.engine.loop import encode_all
from app.lm.forward import CompletionLoss, last_hidden_states
from app.lm.kind import CausalLM
from app.tasks.nli_cot.task import NliCot
from app.train import train
from conftest import ROOT, read_metrics, tiny_config

AUX_WEIGHT = 0.5


def step_lines(out_dir) -> dict[int, dict]:
    return {s: v for s, v in read_metrics(out_dir).items() if "grad_norm" in v}


def write_rows(path, source, n):
    """The first n rows of a bundled sample file."""
    with open(ROOT / "data/sample" / source, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = [row for _, row in zip(range(n), reader)]
        fields = reader.fieldnames
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


# --- several named losses -----------------------------------------------------------------------------------
class TwoLosses(nn.Module):
    """Summed LM cross-entropy plus an auxiliary per-example loss on the final hidden state of each example."""

    def __init__(self, model, share_prefix: bool):
        super().__init__()
        self.model = model
        self.lm = CompletionLoss(model, share_prefix=share_prefix)

    def forward(self, input_ids, attention_mask, labels, shared_prefix: int = 0):
        lm = self.lm(input_ids, attention_mask, labels, shared_prefix)
        hidden = last_hidden_states(self.model, input_ids, attention_mask)
        last = attention_mask.sum(1) - 1
        final = hidden[torch.arange(len(last)), last]  # [batch, hidden]: the hidden state of each row's last token
        aux = (10 * final.mean(-1)) ** 2  # per example, of order 1
        return {"lm": lm, "aux": aux.sum()}


class TwoLossTask(NliCot):
    def __init__(self):
        self.objectives = []

    def objective(self, model, tokenizer, cfg):
        made = TwoLosses(model, cfg.share_prompt_prefix)
        self.objectives.append(made)
        return made

    def loss_items(self, feature):
        return {"lm": super().loss_items(feature), "aux": 1}

    def loss_weights(self, cfg):
        return {"aux": AUX_WEIGHT}


def capture_first_step_grads(monkeypatch) -> dict:
    """The gradients the optimizer sees at its first step (after accumulation and clipping), by parameter id."""
    from app.engine import loop

    captured = {}
    original = loop.make_optimizer

    def spy(cfg, groups):
        optimizer = original(cfg, groups)

        def hook(opt, args, kwargs):
            if not captured:
                captured.update({id(p): p.grad.detach().clone() for g in opt.param_groups for p in g["params"]
                                 if p.grad is not None})

        optimizer.register_step_pre_hook(hook)
        return optimizer

    monkeypatch.setattr(loop, "make_optimizer", spy)
    return captured


def first_global_batch(task, cfg, tokenizer):
    """The features of the engine's first optimizer step, by micro batch (1 process), rebuilt from the data plan."""
    features = encode_all(task, task.load_rows(cfg, "train"), tokenizer, cfg, cfg.train_file)
    accumulation = cfg.batch_size // cfg.micro_batch_size
    plan = BatchPlan(tuple(len(f.input_ids) for f in features), cfg.micro_batch_size, 1, accumulation, cfg.seed,
                     cfg.group_by_length)
    order = plan.epoch_order(0)
    return [[features[i] for i in micro] for micro in plan.micro_batches(order, 0, 0)]


@pytest.fixture(scope="module")
def two_loss_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_losses") / "run"
    task = TwoLossTask()
    with pytest.MonkeyPatch.context() as mp:
        grads = capture_first_step_grads(mp)
        # 2 micro batches per step: the normaliser must be the global batch's counts, not a micro batch's
        cfg = tiny_config(tiny_model_dir, out, max_steps=4, batch_size=8, micro_batch_size=4, max_grad_norm=None,
                          save_every=100)
        assert train(cfg, task) == 0  # the config keeps task='nli_cot', so validation passes
    return cfg, task, grads, out


def test_several_losses_are_logged_and_the_total_is_weighted(two_loss_run):
    cfg, _, _, out = two_loss_run
    lines = step_lines(out)
    assert sorted(lines) == [1, 2, 3, 4]
    for step, v in lines.items():
        assert {"loss", "loss/lm", "loss/aux"} <= set(v), (step, v)
        assert v["loss"] == pytest.approx(v["loss/lm"] + AUX_WEIGHT * v["loss/aux"], rel=1e-6)
        assert v["loss/lm"] > 0 and v["loss/aux"] >= 0
    # where the aux loss is not negligible next to the LM loss, a weight of 1 would show (at least at step 1)
    telling = [s for s, v in lines.items() if v["loss/aux"] > 0.01 * v["loss/lm"]]
    assert 1 in telling, lines
    for s in telling:
        assert lines[s]["loss"] != pytest.approx(lines[s]["loss/lm"] + lines[s]["loss/aux"], rel=1e-3)
    assert not any(k.startswith("loss/") and k not in ("loss/lm", "loss/aux") for v in lines.values() for k in v)


def test_several_losses_logged_values_and_gradient_match_a_direct_computation(two_loss_run):
    """Step 1 recomputed by hand on the initial weights: each sum over its count in the global batch, weighted."""
    cfg, task, grads, out = two_loss_run
    model, tokenizer = task.model_kind(cfg).load(cfg, torch.device("cpu"))  # the initial weights (full fine-tuning)
    objective = TwoLosses(model, cfg.share_prompt_prefix)
    objective.train()
    micro_batches = first_global_batch(task, cfg, tokenizer)
    assert len(micro_batches) == 2 and all(len(m) == 4 for m in micro_batches)
    n_lm = sum(task.loss_items(f)["lm"] for m in micro_batches for f in m)
    n_aux = sum(len(m) for m in micro_batches)
    assert n_aux == 8 and n_lm > 8 * 10

    sums = {"lm": 0.0, "aux": 0.0}
    params = [p for p in objective.parameters() if p.requires_grad]
    grad_lm = [torch.zeros_like(p) for p in params]
    grad_aux = [torch.zeros_like(p) for p in params]
    for m in micro_batches:
        out_sums = objective(**task.collate(m, tokenizer.pad_token_id))
        g_lm = torch.autograd.grad(out_sums["lm"] / n_lm, params, retain_graph=True)
        g_aux = torch.autograd.grad(out_sums["aux"] / n_aux, params, allow_unused=True)  # lm_head: unused
        g_aux = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_aux)]
        for acc, g in zip(grad_lm, g_lm):
            acc += g
        for acc, g in zip(grad_aux, g_aux):
            acc += g
        sums = {k: sums[k] + float(out_sums[k]) for k in sums}

    logged = step_lines(out)[1]
    assert logged["loss/lm"] == pytest.approx(sums["lm"] / n_lm, rel=1e-5)
    assert logged["loss/aux"] == pytest.approx(sums["aux"] / n_aux, rel=1e-5)
    assert logged["loss"] == pytest.approx(sums["lm"] / n_lm + AUX_WEIGHT * sums["aux"] / n_aux, rel=1e-5)

    # the gradient the engine stepped with, by parameter name
    trained = task.objectives[0]
    engine = {n: grads[id(p)] for n, p in trained.named_parameters() if p.requires_grad}
    names = [n for n, p in objective.named_parameters() if p.requires_grad]
    assert set(engine) == set(names) and len(names) == len(params)
    expected = torch.cat([(gl + AUX_WEIGHT * ga).flatten() for gl, ga in zip(grad_lm, grad_aux)])
    got = torch.cat([engine[n].flatten() for n in names])
    scale = expected.abs().max().item()
    assert scale > 0
    err = (got - expected).abs().max().item()
    assert err <= 1e-5 * scale, (err, scale)
    # the same check cannot pass with another weighting or with per-micro-batch normalisation
    unweighted = torch.cat([(gl + ga).flatten() for gl, ga in zip(grad_lm, grad_aux)])
    assert (got - unweighted).abs().max().item() > 100 * err
    assert (got - 2 * expected).abs().max().item() > 100 * err
    # and the logged gradient norm (clipping off) is the norm of that gradient
    assert logged["grad_norm"] == pytest.approx(expected.norm().item(), rel=1e-4)


def test_single_loss_task_logs_exactly_loss(tiny_model_dir, tmp_path):
    """A task with one loss keeps the one `loss` key (no `loss/...`), its value the per-token mean."""
    task = NliCot()
    out = tmp_path / "single"
    cfg = tiny_config(tiny_model_dir, out, max_steps=3, batch_size=4, micro_batch_size=4, save_every=100)
    assert train(cfg, task) == 0
    lines = step_lines(out)
    assert sorted(lines) == [1, 2, 3]
    for v in lines.values():
        assert set(v) >= {"loss", "lr", "grad_norm"}
        assert not [k for k in v if k.startswith("loss/")], v
    assert not [k for v in read_metrics(out).values() for k in v if k.startswith("eval/")]  # dev_file=None
    # step 1 ran on the initial weights: its loss is the summed CE over the batch's target tokens
    model, tokenizer = task.model_kind(cfg).load(cfg, torch.device("cpu"))
    (batch,) = first_global_batch(task, cfg, tokenizer)
    with torch.no_grad():
        total = float(task.objective(model, tokenizer, cfg)(**task.collate(batch, tokenizer.pad_token_id)))
    assert lines[1]["loss"] == pytest.approx(total / sum(task.loss_items(f) for f in batch), rel=1e-5)


# --- parameter groups, resume, on_train_end ---------------------------------------------------------------------
EMBED = "model.embed_tokens.weight"


class EmbeddingsInAZeroLrGroup(CausalLM):
    """The Hugging Face model kind with its embeddings in a parameter group of their own, at a learning rate of 0."""

    def param_groups(self, objective, cfg):
        embed = objective.model.get_input_embeddings().weight
        rest = [p for p in objective.parameters() if p.requires_grad and p is not embed]
        return [{"params": [embed], "lr": 0.0}, {"params": rest}]


class GroupsTask(NliCot):
    """Embeddings frozen by a learning rate of 0 in their own group; records every on_train_end call."""

    def __init__(self, calls: list):
        self.calls = calls

    def model_kind(self, cfg):
        return EmbeddingsInAZeroLrGroup()

    def on_train_end(self, cfg, final_dir):
        root = ckpt.checkpoints_dir(cfg.out_path)
        self.calls.append({
            "dir": final_dir,
            "is_dir": final_dir.is_dir(),
            "state": ckpt.read_json(final_dir / "trainer_state.json") if (final_dir / "trainer_state.json").is_file()
            else None,
            "manifest": (final_dir / ckpt.MANIFEST).is_file(),
            "temp_left": sorted(p.name for p in root.iterdir() if p.name.startswith(".tmp-")),
        })


GROUP_RUN = dict(max_steps=6, batch_size=4, micro_batch_size=4, save_every=100, warmup_steps=2, lr_scheduler="cosine")


@pytest.fixture(scope="module")
def group_runs(tiny_model_dir, tmp_path_factory):
    """An uninterrupted run, and the same run stopped after 3 steps then re-run; on_train_end calls of each
    invocation."""
    root = tmp_path_factory.mktemp("groups")
    calls = {}
    def run(key, out, **extra):
        calls[key] = []
        cfg = tiny_config(tiny_model_dir, out, **GROUP_RUN, **extra)
        assert train(cfg, GroupsTask(calls[key])) == 0
        return cfg

    cfg = run("whole", root / "whole")
    run("stopped", root / "split", stop_after_steps=3)
    stopped_dir = ckpt.latest(root / "split")
    stopped_state = ckpt.read_json(stopped_dir / "trainer_state.json")
    run("resumed", root / "split")
    run("again", root / "whole")  # a finished run: not trained again, no second hook call
    return {"cfg": cfg, "whole": root / "whole", "split": root / "split", "calls": calls, "stopped_dir": stopped_dir,
            "stopped_state": stopped_state}


def test_param_groups_zero_lr_group_stays_bitwise_unchanged(group_runs, tiny_model_dir):
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    final = load_file(str(group_runs["whole"] / "checkpoints/final/model.safetensors"))
    assert set(final) == set(original) and EMBED in final
    assert torch.equal(final[EMBED], original[EMBED])
    unchanged = [k for k in original if k != EMBED and torch.equal(original[k], final[k])]
    assert unchanged == []  # every other tensor trained (lm_head is untied from the embeddings)


def test_param_groups_are_saved_with_their_learning_rates(group_runs):
    cfg = group_runs["cfg"]
    n_params = len(load_file(str(group_runs["whole"] / "checkpoints/final/model.safetensors")))
    stopped = ckpt.read_json(group_runs["stopped_dir"] / "optimizer.json")
    assert group_runs["stopped_dir"].name == ckpt.step_name(3) and group_runs["stopped_state"]["step"] == 3
    groups = stopped["param_groups"]
    assert len(groups) == 2
    assert groups[0]["lr"] == 0.0 and groups[0]["initial_lr"] == 0.0 and len(groups[0]["params"]) == 1
    assert groups[1]["initial_lr"] == cfg.learning_rate and len(groups[1]["params"]) == n_params - 1
    # cosine after 2 warmup steps over 6: the lr set for step 4
    progress = (3 - GROUP_RUN["warmup_steps"]) / (GROUP_RUN["max_steps"] - GROUP_RUN["warmup_steps"])
    assert groups[1]["lr"] == pytest.approx(cfg.learning_rate * 0.5 * (1 + math.cos(math.pi * progress)), rel=1e-9)
    final = ckpt.read_json(group_runs["whole"] / "checkpoints/final/optimizer.json")
    assert [len(g["params"]) for g in final["param_groups"]] == [1, n_params - 1]
    assert [g["initial_lr"] for g in final["param_groups"]] == [0.0, cfg.learning_rate]


def test_param_groups_resume_equals_uninterrupted_run(group_runs):
    name = "checkpoints/final/model.safetensors"
    whole, split = load_file(str(group_runs["whole"] / name)), load_file(str(group_runs["split"] / name))
    assert set(whole) == set(split)
    diff = max((whole[k] - split[k]).abs().max().item() for k in whole)
    assert diff <= 1e-6, diff
    assert torch.equal(whole[EMBED], split[EMBED])
    got, want = step_lines(group_runs["split"]), step_lines(group_runs["whole"])
    assert sorted(got) == sorted(want) == list(range(1, 7))
    assert [got[s]["loss"] for s in got] == pytest.approx([want[s]["loss"] for s in want], abs=1e-6)
    a = ckpt.read_json(group_runs["split"] / "checkpoints/final/optimizer.json")["param_groups"]
    b = ckpt.read_json(group_runs["whole"] / "checkpoints/final/optimizer.json")["param_groups"]
    assert a == b


def test_on_train_end_runs_once_on_the_published_final_checkpoint(group_runs):
    calls = group_runs["calls"]
    assert calls["stopped"] == []  # stop_after_steps: no end of training
    assert calls["again"] == []  # an already finished run
    for key, out in (("whole", group_runs["whole"]), ("resumed", group_runs["split"])):
        assert len(calls[key]) == 1, calls[key]
        (call,) = calls[key]
        assert call["dir"] == ckpt.checkpoints_dir(out) / "final"
        assert call["is_dir"] and call["manifest"] and call["temp_left"] == []
        assert call["state"] is not None and call["state"]["step"] == GROUP_RUN["max_steps"]


# --- the evaluation context ---------------------------------------------------------------------------------------
MACRO_F1 = {2: 0.2, 4: 0.8, 6: 0.5, 8: 0.1}  # by step: the best is step 4


class EvalTask(NliCot):
    def __init__(self):
        self.seen, self.objectives = [], []

    def objective(self, model, tokenizer, cfg):
        made = super().objective(model, tokenizer, cfg)
        self.objectives.append(made)
        return made

    def evaluate(self, model, tokenizer, cfg, rows, ctx):
        self.seen.append({"step": ctx.step, "epoch": ctx.epoch, "steps_per_epoch": ctx.steps_per_epoch,
                          "out_dir": ctx.out_dir, "objective": ctx.objective, "end_of_epoch": ctx.end_of_epoch,
                          "training": ctx.objective.training, "model": model, "rows": len(rows),
                          "device": ctx.device})
        return {"accuracy": 1.0 - MACRO_F1[ctx.step], "macro_f1": MACRO_F1[ctx.step], "parse_failures": 0.0}


def test_eval_context_steps_epochs_and_objective(tiny_model_dir, tmp_path):
    task = EvalTask()
    out = tmp_path / "eval"
    train_file = write_rows(tmp_path / "train.csv", "train.csv", 18)  # 4 steps of 4 per epoch (2 rows left out)
    dev_file = write_rows(tmp_path / "dev.csv", "dev.csv", 5)
    cfg = tiny_config(tiny_model_dir, out, train_file=train_file, dev_file=dev_file, eval_rows=3, max_steps=8,
                      batch_size=4, micro_batch_size=4, eval_every=2, save_every=100)
    assert train(cfg, task) == 0
    assert [s["step"] for s in task.seen] == [2, 4, 6, 8]
    assert [s["epoch"] for s in task.seen] == [0, 1, 1, 2]
    assert [s["end_of_epoch"] for s in task.seen] == [False, True, False, True]
    assert {s["steps_per_epoch"] for s in task.seen} == {4}
    assert {s["out_dir"] for s in task.seen} == {cfg.out_path}
    assert {s["rows"] for s in task.seen} == {3}  # eval_rows
    assert all(s["device"].type == "cpu" for s in task.seen)
    (objective,) = task.objectives
    assert all(s["objective"] is objective for s in task.seen)  # the module being trained, not a copy
    assert all(s["model"] is objective.model for s in task.seen)
    assert not any(s["training"] for s in task.seen)  # evaluated in eval mode
    assert objective.training  # and put back in training mode
    metrics = read_metrics(out)
    for step, f1 in MACRO_F1.items():
        assert metrics[step]["eval/macro_f1"] == f1
        assert metrics[step]["eval/accuracy"] == pytest.approx(1.0 - f1)
        assert metrics[step]["eval/dev_loss"] > 0
    best = ckpt.read_json(out / "checkpoints/best/trainer_state.json")
    assert best["step"] == 4 and best["best"]["best"] == {"metric": "macro_f1", "value": 0.8, "step": 4}


# --- model kinds ----------------------------------------------------------------------------------------------------
def test_each_task_names_its_model_kind_and_what_a_sharded_run_turns_off(tmp_path):
    """The model side of every task is its kind: the Hugging Face one with the task's added tokens and head rows and
    the prefix sharing FSDP2 cannot shard (ranking's question prefix too), or the from-scratch GPT."""
    from app.config import make_config
    from app.registry import get_task
    from app.tasks.lookahead.task import ScratchGPT

    kinds = {name: get_task(name).model_kind(make_config(task=name)) for name in
             ("nli_cot", "confidence_tokens", "confidence_head", "ranking", "lookahead")}
    assert kinds["nli_cot"] == CausalLM()
    assert kinds["confidence_head"] == CausalLM(added_tokens=("<CONFIDENCE>",))
    assert kinds["confidence_tokens"].head_rows and len(kinds["confidence_tokens"].added_tokens) > 2
    assert isinstance(kinds["lookahead"], ScratchGPT)
    sharing = make_config(task="ranking", share_prompt_prefix=True, share_question_prefix=True)
    assert kinds["ranking"].fsdp_overrides(sharing) == {"share_prompt_prefix": False, "share_question_prefix": False}
    assert kinds["nli_cot"].fsdp_overrides(make_config(share_prompt_prefix=True)) == {"share_prompt_prefix": False}
    assert kinds["nli_cot"].fsdp_overrides(make_config(share_prompt_prefix=False)) == {}
    assert kinds["lookahead"].fsdp_overrides(make_config(task="lookahead")) == {}


def test_ranking_objective_pads_with_the_tokenizer_it_is_given(tiny_model_dir, tmp_path):
    """The objective receives the tokenizer (no pad id kept on the task between load and objective): a tokenizer
    whose pad id differs gives an objective that pads with that id."""
    from app.tasks.ranking.task import Ranking

    cfg = tiny_config(tiny_model_dir, tmp_path, task="ranking")
    task = Ranking()
    model, tokenizer = task.model_kind(cfg).load(cfg, torch.device("cpu"))
    assert task.objective(model, tokenizer, cfg).pad_id == tokenizer.pad_token_id

    class OtherPad:
        pad_token_id = tokenizer.pad_token_id + 7

    assert task.objective(model, OtherPad(), cfg).pad_id == tokenizer.pad_token_id + 7
    assert not hasattr(task, "_pad_id")
