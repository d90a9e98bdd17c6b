"""The lookahead task: models, the two-pass step against its transcription, cached and all-position passes, the
experiment (resume after a kill, results JSON, plots) and the honesty check of its evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import read_metrics

from app.tasks.lookahead import step
from app.tasks.lookahead.model import GPT, GPTShape, parameter_breakdown, plain_state_dict, shapes

V = 257


def _conf_model(L=12, seed=0, randomize=True, dtype=torch.float64):
    torch.manual_seed(seed)
    model = GPT(shapes(V, L + 1, 2, 2, 16, 4)["confidence"]).to(dtype)
    if randomize:  # a trained-looking model: the adaptive norms away from zero
        with torch.no_grad():
            for b in model.blocks:
                for n in (b.ln1, b.ln2):
                    n.proj.weight.normal_(0, 0.2)
                    n.proj.bias.normal_(0, 0.2)
    return model


def _data(B=3, L=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, L + 2), generator=g)


# --- models --------------------------------------------------------------------------------------------------------
def test_shapes_and_zero_init():
    model = _conf_model(randomize=False, dtype=torch.float32)
    x = _data()[:, :12]
    logits, conf = model(x, confidence_scalars=torch.randn(3, 12))
    assert logits.shape == (3, 12, V) and conf.shape == (3, 12)
    assert torch.allclose(conf, torch.full_like(conf, 2.0), atol=0.5)  # confidence_init_bias
    for b in model.blocks:
        assert not b.ln1.proj.weight.any() and not b.ln1.proj.bias.any()
    # at init, any confidence input gives exactly the standard transformer
    plain = GPT(GPTShape(**{**model.shape.to_dict(), "confidence": False}))
    plain.load_state_dict(plain_state_dict(model))
    ref, _ = plain(x)
    assert torch.allclose(model(x, confidence_scalars=torch.randn(3, 12) * 5)[0], ref, atol=1e-6)


def test_zero_confidence_equals_plain_with_same_weights():
    model = _conf_model()
    plain = GPT(GPTShape(**{**model.shape.to_dict(), "confidence": False})).double()
    plain.load_state_dict(plain_state_dict(model))
    x = _data()[:, :12]
    assert torch.allclose(model(x, confidence_scalars=torch.zeros(3, 12))[0], plain(x)[0], atol=1e-10)
    assert not torch.allclose(model(x, confidence_scalars=torch.ones(3, 12))[0], plain(x)[0], atol=1e-4)


@pytest.mark.parametrize("size", [(2, 2, 64, 4), (4, 4, 128, 4), (6, 6, 384, 4), (1, 1, 16, 4)])
def test_parameter_counts_matched(size):
    layers, heads, dim, ratio = size
    sh = shapes(V, 129, layers, heads, dim, ratio)
    counts = {k: parameter_breakdown(GPT(s))["total"] for k, s in sh.items()}
    assert abs(counts["plain"] - counts["confidence"]) / counts["confidence"] < 0.005, counts
    assert sh["plain"].d_mlp > sh["confidence"].d_mlp


# --- the step ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cached", [True, False])
def test_seed_step_matches_transcription(cached):
    """Same RNG -> same sampled tokens, losses, future losses, carried confidences and gradients."""
    data, alpha = _data(), 0.7
    prev = torch.rand(3, 12, dtype=torch.float64) * 3
    ref_model, model = _conf_model(), _conf_model()
    torch.manual_seed(11)
    ref = step.seed_step_reference(ref_model, data, prev, alpha)
    ref["loss"].backward()
    torch.manual_seed(11)
    out = step.seed_step(model, data, prev, cached=cached)
    B = data.size(0)
    (out.lm_sum / B + alpha * out.confidence_sum / B).backward()
    assert torch.equal(out.sampled, ref["sampled"])
    assert torch.allclose(out.lm_sum / B, ref["loss_lm"], atol=1e-12)
    assert torch.allclose(out.confidence_sum / B, ref["loss_conf"], atol=1e-10)
    assert torch.allclose(out.future_loss, ref["future_loss"], atol=1e-10)
    assert torch.allclose(out.prev_conf, ref["prev_conf"], atol=1e-12)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-10), name
    assert not out.future_loss.requires_grad


def test_cached_pass2_equals_recomputed():
    model, data = _conf_model(), _data(B=4)
    prev = torch.rand(4, 12, dtype=torch.float64)
    torch.manual_seed(3)
    a = step.seed_step(model, data, prev, cached=True)
    torch.manual_seed(3)
    b = step.seed_step(model, data, prev, cached=False)
    assert torch.equal(a.sampled, b.sampled)
    assert torch.allclose(a.future_loss, b.future_loss, atol=1e-12)


def test_all_position_lookahead_equals_loop():
    model, data = _conf_model(), _data(B=2)
    prev = torch.rand(2, 12, dtype=torch.float64) * 2
    torch.manual_seed(5)
    out = step.all_position_step(model, data, prev)
    loop = step.all_position_reference(model, data, prev, out.sampled, out.confidence_pred.detach())
    assert torch.allclose(out.future_loss.float(), loop, atol=1e-5)
    # the LM part is the plain all-position loss; the confidence part trains the predictor
    logits, _ = model(data[:, :12], confidence_scalars=prev)
    lm = torch.nn.functional.cross_entropy(logits.reshape(-1, V), data[:, 1:13].reshape(-1), reduction="sum")
    assert torch.allclose(out.lm_sum, lm)
    out.confidence_sum.backward()
    assert model.confidence_predictor.weight.grad.abs().sum() > 0


def test_causal_confidence_has_no_future_information():
    """Changing a later token never changes earlier confidence inputs or predictions at eval."""
    model, data = _conf_model(), _data(B=1)
    changed = data.clone()
    changed[0, 8] = (changed[0, 8] + 1) % 256
    a, b = step.causal_confidence(model, data[:, :12]), step.causal_confidence(model, changed[:, :12])
    assert torch.equal(a[:, :9], b[:, :9])


# --- the experiment ------------------------------------------------------------------------------------------------
TINY = ["--corpus_chars=60000", "--context_length=32", "--max_seq_length=34", "--n_layer=1", "--n_head=2",
        "--d_model=32", "--batch_size=16", "--micro_batch_size=16", "--max_steps=40", "--eval_every=20",
        "--save_every=10", "--log_every=5", "--eval_rows=40", "--experiment_seeds=[7, 8]",
        "--experiment_models=['confidence', 'plain']", "--calibration_points=500", "--learning_rate=0.01",
        "--warmup_steps=2"]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """A tiny experiment killed (stop_after_steps) during its first run, then re-run to the end."""
    from app.tasks.lookahead.experiment import run_experiment

    root = tmp_path_factory.mktemp("lookahead")
    args = [*TINY, f"--out_dir={root}/runs"]
    first = run_experiment("configs/lookahead_tiny.py", [*args, "--stop_after_steps=13"], str(root / "results"))
    stopped = sorted(p.name for p in (root / "runs" / "confidence_seed7" / "checkpoints").iterdir())
    results_after_first = (root / "results").exists()
    second = run_experiment("configs/lookahead_tiny.py", args, str(root / "results"))
    return {"root": root, "args": args, "first": first, "stopped": stopped, "path": second,
            "results_after_first": results_after_first}


def test_killed_experiment_resumes_exactly(experiment, tmp_path):
    from safetensors.torch import load_file

    from app.config import load_config
    from app.train import train

    assert experiment["first"] == 0  # stop_after_steps: stopped on purpose, nothing written yet
    assert not experiment["results_after_first"]
    assert "step_0000013" in experiment["stopped"] and "final" not in experiment["stopped"]
    root = experiment["root"]
    for name in ("confidence_seed7", "plain_seed7", "confidence_seed8", "plain_seed8"):
        assert (root / "runs" / name / "checkpoints" / "final" / "model.safetensors").is_file()
    # the interrupted run equals an uninterrupted one (weights and the carried confidences)
    cfg = load_config("configs/lookahead_tiny.py", [*TINY, "--seed=7", "--lookahead_model=confidence",
                                                    f"--out_dir={tmp_path}/straight"])
    assert train(cfg) == 0
    a = load_file(str(root / "runs" / "confidence_seed7" / "checkpoints" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "checkpoints" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    s1 = load_file(str(root / "runs" / "confidence_seed7" / "checkpoints" / "final" / "lookahead_state.safetensors"))
    s2 = load_file(str(tmp_path / "straight" / "checkpoints" / "final" / "lookahead_state.safetensors"))
    assert torch.allclose(s1["prev_conf"], s2["prev_conf"], atol=1e-6)


def test_results_json_round_trip_and_plots(experiment):
    from click.testing import CliRunner

    from app.cli import cli
    from app.tasks.lookahead.experiment import load_results, summary_table

    path = Path(experiment["path"])
    assert path.parent.name == "results" and path.name.endswith("_results.json")
    results = load_results(path)
    assert json.loads(json.dumps(results)) == results
    assert set(results["runs"]) == {"plain", "confidence"} and set(results["runs"]["plain"]) == {"7", "8"}
    run = results["runs"]["confidence"]["7"]
    assert run["history"]["train"]["loss/lm"] and run["history"]["eval"]["perplexity"][-1][0] == 40
    assert len(run["final"]["pairs"]["predicted"]) == 500 and run["wall_time_s"] > 0
    assert results["config"]["experiment_seeds"] == [7, 8]
    s = results["summary"]
    assert s["models"]["plain"]["perplexity"]["n"] == 2 and "perplexity" in s["difference"]
    # the same number of tokens for both models of a seed
    assert results["runs"]["plain"]["7"]["history"]["train"]["loss"][-1][0] == 40
    stamp = path.name.removesuffix("_results.json")
    for kind in ("loss_curves", "calibration", "time"):
        assert (path.parent / f"{stamp}_{kind}.png").stat().st_size > 1000
        (path.parent / f"{stamp}_{kind}.png").unlink()
    table = summary_table(results)
    assert "perplexity" in table and "confidence - plain" in table
    res = CliRunner().invoke(cli, ["plot", str(path)])
    assert res.exit_code == 0, res.output
    assert "confidence_spearman" in res.output
    for kind in ("loss_curves", "calibration", "time"):
        assert (path.parent / f"{stamp}_{kind}.png").is_file()


def test_rerun_of_finished_experiment_trains_nothing(experiment, capsys):
    from app.tasks.lookahead.experiment import run_experiment

    root = experiment["root"]
    before = (root / "runs" / "plain_seed8" / "metrics.jsonl").read_text()
    path = run_experiment("configs/lookahead_tiny.py", experiment["args"], str(root / "results2"))
    assert isinstance(path, Path) and (root / "runs" / "plain_seed8" / "metrics.jsonl").read_text() == before


def test_shuffled_confidence_does_not_collapse_perplexity(experiment):
    """Eval perplexity with the confidence inputs shuffled across the batch stays where it was: no leak."""
    from app.config import load_config
    from app.tasks.lookahead.task import Lookahead, dev_tensor, evaluate_model

    cfg = load_config("configs/lookahead_tiny.py", [*TINY, "--lookahead_model=confidence",
                                                    f"--out_dir={experiment['root']}/runs/confidence_seed7"])
    task = Lookahead()
    model, tok = task.model_kind(cfg).load(cfg, torch.device("cpu"), Path(cfg.out_dir) / "checkpoints" / "final")
    assert any(b.ln1.proj.weight.abs().sum() > 0 for b in model.blocks)  # the confidence path is in use
    data = dev_tensor(task.load_rows(cfg, "dev"), tok, cfg)
    plain = evaluate_model(model, data, 16)
    shuffled = evaluate_model(model, data, 16, shuffle=True)
    assert plain["perplexity"] < 60  # it learned something
    assert abs(shuffled["perplexity"] - plain["perplexity"]) / plain["perplexity"] < 0.05
    results = json.loads(Path(experiment["path"]).read_text())
    for model_name in ("plain", "confidence"):  # both models evaluated by the same function, all positions
        assert "perplexity" in results["runs"][model_name]["7"]["final"]


def test_corpus_and_tokenizer():
    from app.tasks.lookahead import corpus
    from app.tasks.lookahead.task import build_tokenizer

    text = corpus.read_corpus(corpus.DEFAULT_CORPUS)
    assert 500_000 < len(text) < 5_000_000 and "HAMLET" in text
    train, dev = corpus.split_text(text, 0.05)
    assert train + dev == text and abs(len(dev) - 0.05 * len(text)) < 2
    tok = build_tokenizer()
    sample = text[1000:1066]
    ids = tok(sample, add_special_tokens=False).input_ids
    assert ids == list(sample.encode("ascii")) and tok.decode(ids) == sample
    assert tok.pad_token_id == 256 and len(tok) == 257


@pytest.mark.parametrize("variant", ["seed", "fair"])
def test_objective_sums_match_the_step_and_carry_confidences(variant):
    """The engine's objective: summed losses with the counts of loss_items; prev_conf carried to the next step."""
    from app.config import make_config
    from app.data import Row
    from app.tasks.lookahead.task import Lookahead, build_tokenizer

    cfg = make_config(task="lookahead", lookahead_variant=variant, context_length=12, max_seq_length=14)
    task, tok = Lookahead(), build_tokenizer()
    text = "To be, or not to be, that is the question:"
    feats = [task.encode(Row(i + 1, {"text": text[i : i + 14]}), tok, cfg) for i in range(3)]
    items = task.loss_items(feats[0])
    assert items == ({"lm": 1, "confidence": 1} if variant == "seed" else {"lm": 12, "confidence": 12})
    batch = task.collate(feats, tok.pad_token_id)
    model = _conf_model(dtype=torch.float32)
    objective = task.objective(model, tok, cfg)
    objective.train()
    torch.manual_seed(4)
    sums = objective(**batch)
    assert set(sums) == {"lm", "confidence"} and objective.prev_conf.shape == (3, 12)
    torch.manual_seed(4)
    if variant == "seed":
        ref = step.seed_step_reference(model, batch["input_ids"], torch.zeros(3, 12), 1.0)
        assert torch.allclose(sums["lm"] / 3, ref["loss_lm"], atol=1e-6)
        assert torch.allclose(sums["confidence"] / 3, ref["loss_conf"], atol=1e-5)
    carried = objective.prev_conf.clone()
    torch.manual_seed(5)
    objective(**batch)  # the second step receives the first step's predictions
    torch.manual_seed(5)
    expected = (step.seed_step(model, batch["input_ids"], carried) if variant == "seed"
                else step.all_position_step(model, batch["input_ids"], carried)).prev_conf
    assert torch.allclose(objective.prev_conf, expected)
    objective.eval()
    with torch.no_grad():
        a, b = objective(**batch), objective(**batch)  # evaluation is deterministic
    assert torch.equal(a["lm"], b["lm"]) and torch.equal(a["confidence"], b["confidence"])


def test_detached_confidence_trains_the_head_only():
    model, data = _conf_model(), _data()
    model.detach_confidence = True
    out = step.all_position_step(model, data, torch.zeros(3, 12, dtype=torch.float64))
    out.confidence_sum.backward()
    assert model.confidence_predictor.weight.grad.abs().sum() > 0
    assert model.blocks[0].fc.weight.grad is None or not model.blocks[0].fc.weight.grad.any()


def test_causal_confidence_inputs_in_training():
    from app.config import make_config
    from app.data import Row
    from app.tasks.lookahead.task import Lookahead, build_tokenizer

    cfg = make_config(task="lookahead", confidence_inputs="causal", context_length=12, max_seq_length=14)
    task, tok = Lookahead(), build_tokenizer()
    text = "Now is the winter of our discontent"
    batch = task.collate([task.encode(Row(i + 1, {"text": text[i : i + 14]}), tok, cfg) for i in range(2)],
                         tok.pad_token_id)
    model = _conf_model(dtype=torch.float32)
    objective = task.objective(model, tok, cfg).train()
    torch.manual_seed(2)
    sums = objective(**batch)
    torch.manual_seed(2)
    ref = step.all_position_step(model, batch["input_ids"], step.causal_confidence(model, batch["input_ids"][:, :12]))
    assert torch.allclose(sums["lm"], ref.lm_sum) and torch.allclose(sums["confidence"], ref.confidence_sum)


def test_parameter_table_printed_by_the_experiment():
    from app.config import load_config
    from app.tasks.lookahead.experiment import parameter_table

    table = parameter_table(load_config("configs/lookahead.py"))
    assert "confidence_predictor" in table and "d_mlp=514" in table and "totals differ by 0.014%" in table


def test_seed_variant_trains_through_the_engine(tmp_path):
    from app.config import load_config
    from app.train import train
    from app.metrics.plots import read_metrics

    cfg = load_config("configs/lookahead_tiny.py", [*TINY, "--lookahead_variant=seed", "--max_steps=6",
                                                    "--eval_every=6", "--log_every=2", f"--out_dir={tmp_path}/seed"])
    assert train(cfg) == 0
    records = read_metrics(tmp_path / "seed" / "metrics.jsonl")
    assert any("loss/confidence" in r for r in records)
    final = [r for r in records if "eval/perplexity" in r][-1]
    assert final["step"] == 6 and final["eval/perplexity"] > 1


# --- the baseline trained as nanoGPT trains ------------------------------------------------------------------------
def _plain_objective(cfg_overrides=()):
    from app.config import load_config
    from app.tasks.lookahead.task import Lookahead

    cfg = load_config("configs/lookahead_tiny.py", ["--lookahead_model=plain", *cfg_overrides])
    task = Lookahead()
    model, tokenizer = task.model_kind(cfg).load(cfg, torch.device("cpu"))
    return task, cfg, task.objective(model, tokenizer, cfg)


def test_weight_decay_on_matrices_only():
    """MiniGPT: embeddings and Linear weights decay; biases and LayerNorms do not (one AdamW step on zero gradients
    moves exactly the decayed parameters, by the factor 1 - lr x weight_decay)."""
    from app.engine.optim import make_optimizer

    task, cfg, objective = _plain_objective()
    groups = task.model_kind(cfg).param_groups(objective, cfg)
    names = {id(p): n for n, p in objective.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] for p in g["params"]}
    kept = {names[id(p)] for g in groups if not g["weight_decay"] for p in g["params"]}
    blocks = [f"model.blocks.{i}" for i in range(cfg.n_layer)]
    assert decayed == {"model.tok_emb.weight", "model.pos_emb.weight",
                       *(f"{b}.{m}.weight" for b in blocks for m in ("qkv", "proj", "fc", "out"))}
    assert kept == {"model.ln_f.weight", "model.ln_f.bias",
                    *(f"{b}.{m}.{w}" for b in blocks for m in ("ln1", "ln2") for w in ("weight", "bias")),
                    *(f"{b}.{m}.bias" for b in blocks for m in ("qkv", "proj", "fc", "out"))}
    assert decayed | kept == set(names.values()) and cfg.weight_decay > 0

    optimizer = make_optimizer(cfg, groups)
    before = {n: p.detach().clone() for n, p in objective.named_parameters()}
    for p in objective.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    shrink = 1 - cfg.learning_rate * cfg.weight_decay
    for n, p in objective.named_parameters():
        expected = before[n] * shrink if n in decayed else before[n]
        assert torch.allclose(p.detach(), expected, rtol=1e-6, atol=0), n


def test_residual_projections_start_smaller():
    """GPT-2's init: N(0, 0.02) weights, and 0.02 / sqrt(2 n_layer) for the projections into the residual stream."""
    from app.tasks.lookahead.model import residual_init_std

    torch.manual_seed(0)
    model = GPT(shapes(V, 129, 4, 4, 128, 4)["plain"])
    assert residual_init_std(4) == pytest.approx(0.02 / 8 ** 0.5)
    for b in model.blocks:  # 16k and 66k draws: the sample std is within 2% of the true one by a wide margin
        assert b.proj.weight.std().item() == pytest.approx(residual_init_std(4), rel=0.05)
        assert b.out.weight.std().item() == pytest.approx(residual_init_std(4), rel=0.05)
        assert b.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert b.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert not b.proj.bias.any() and not b.out.bias.any()


def test_window_offsets_seeded_and_uniform():
    from app.engine.batching import BatchPlan

    lengths = (20, 20, 11, 20, 15, 20, 20, 20)  # windows of 10: offsets 0..10, 0..1 (length 11), 0..5 (15)
    plan = BatchPlan(lengths, 2, 1, 2, seed=3, group_by_length=False, window=10)
    slots = plan.epoch_order(0)[0]
    starts = plan.window_starts(0, 0, slots)
    assert starts == plan.window_starts(0, 0, slots)  # a pure function of (seed, epoch, step): resumable
    assert [len(s) for s in starts] == [2, 2]
    other_seed = BatchPlan(lengths, 2, 1, 2, seed=4, group_by_length=False, window=10)
    drawn = {seed: [BatchPlan(lengths, 2, 1, 2, seed, False, 10).window_starts(e, k, [[0, 1], [3, 5]])
                    for e in range(3) for k in range(2)] for seed in (3, 4)}
    assert drawn[3] != drawn[4] and other_seed.epoch_order(0) != plan.epoch_order(0)
    seen = {i: set() for i in range(len(lengths))}
    for e in range(60):
        for k in range(plan.steps_per_epoch):
            step = plan.epoch_order(e)[k]
            for slot, offsets in zip(step, plan.window_starts(e, k, step)):
                for i, o in zip(slot, offsets):
                    seen[i].add(o)
    for i, n in enumerate(lengths):  # every offset of every example drawn, none past its end
        assert seen[i] == set(range(n - 10 + 1)), i


def test_training_windows_are_the_corpus_at_random_offsets():
    """The engine's step examples for the lookahead task: windows of L + 2 tokens of the training text, starting
    anywhere (not on the fixed chunk grid), different for another seed; dev chunks stay fixed."""
    from app.engine.batching import BatchPlan
    from app.engine.loop import encode_window_sources, loss_counts, step_examples
    from app.tasks.lookahead import corpus
    from app.tasks.lookahead.task import build_tokenizer

    task, cfg, _ = _plain_objective(["--corpus_chars=20000"])
    need, tok = cfg.context_length + 2, build_tokenizer()
    train_text, dev_text = corpus.split_text(corpus.read_corpus(cfg.corpus_file, cfg.corpus_chars),
                                             cfg.corpus_dev_fraction)
    features = encode_window_sources(task, task.load_rows(cfg, "train"), tok, cfg, "corpus")
    items = [loss_counts(task, f) for f in features]

    def starts(seed):
        plan = BatchPlan(tuple(len(f.input_ids) for f in features), 8, 1, 4, seed, False, task.train_window(cfg))
        out = []
        for k in range(3):
            slots = plan.epoch_order(0)[k]
            for slot, examples in zip(slots, step_examples(task, plan, features, items, slots, k)):
                for i, (f, counts) in zip(slot, examples):
                    text = bytes(f.input_ids).decode("ascii")
                    start = train_text.index(text, i * need)
                    assert len(f.input_ids) == need and counts == {"lm": cfg.context_length}
                    assert i * need <= start < (i + 1) * need
                    out.append(start)
        return out

    a = starts(cfg.seed)
    assert a == starts(cfg.seed) and a != starts(cfg.seed + 1)
    assert sum(s % need != 0 for s in a) > len(a) // 2
    dev = task.load_rows(cfg, "dev")
    assert [r.values["text"] for r in dev] == corpus.chunks(dev_text, need)


PLAIN_TINY = [*TINY, "--lookahead_model=plain", "--max_steps=24", "--eval_every=8", "--save_every=100",
              "--weight_decay=0.1"]


def test_resumed_run_with_random_windows_equals_uninterrupted(tmp_path):
    """A stopped run resumed equals a straight one bit for bit (CPU), windows included; its dev loss falls."""
    from safetensors.torch import load_file

    from app.config import load_config
    from app.train import train

    def final_weights(name, *extra):
        cfg = load_config("configs/lookahead_tiny.py", [*PLAIN_TINY, f"--out_dir={tmp_path / name}", *extra])
        assert train(cfg) == 0
        final = tmp_path / name / "checkpoints" / "final" / "model.safetensors"
        return load_file(str(final)) if final.is_file() else None

    straight = final_weights("straight")
    assert final_weights("stopped", "--stop_after_steps=11") is None  # stopped on purpose at step 11
    resumed = final_weights("stopped")
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    evals = [v["eval/dev_loss"] for _, v in sorted(read_metrics(tmp_path / "straight").items()) if "eval/dev_loss" in v]
    assert len(evals) == 3 and evals[0] > evals[1] > evals[2]
    other_seed = final_weights("seed", "--seed=43")
    assert not torch.equal(other_seed["blocks.0.fc.weight"], straight["blocks.0.fc.weight"])
