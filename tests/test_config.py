"""Config modules: loading, base configs, overrides, strict validation with one-line errors."""

from __future__ import annotations


import pytest

from app.config import Config, config_class, load_config, parse_override, saved_config
from app.errors import UserError
from conftest import ROOT, run_app

CONFIGS = sorted((ROOT / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    if path.name.startswith("cot_"):  # data-generation recipes (python -m app cot ...) have their own schema
        from app.tasks.nli_cot.datagen.config import DatagenConfig, load_datagen_config

        assert isinstance(load_datagen_config(path), DatagenConfig)
        return
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_recipes_hold_the_documented_values():
    d = load_config(ROOT / "configs/default.py")
    assert (d.model_name, d.quantization, d.bnb_4bit_quant_type, d.bnb_4bit_use_double_quant) == (
        "mistralai/Mistral-7B-v0.3", "4bit", "nf4", True)
    assert (d.lora_r, d.lora_alpha, d.lora_dropout, d.max_seq_length) == (16, 32, 0.05, 512)
    assert d.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (d.lr_scheduler, d.warmup_steps, d.learning_rate, d.batch_size, d.num_epochs, d.max_grad_norm) == (
        "cosine", 75, 2e-4, 16, 2, 1.0)
    a = load_config(ROOT / "configs/ablation1.py")
    assert (a.lora_r, a.lora_alpha, a.batch_size, a.warmup_steps, a.max_grad_norm) == (32, 64, 64, 150, 1.0)
    assert a.learning_rate < d.learning_rate
    assert a.batch_size // a.micro_batch_size > 1  # the larger batch comes from accumulation
    assert a.quantization == "4bit"  # inherited from default.py


def test_base_config_chain_and_override_order(tmp_path):
    (tmp_path / "a.py").write_text('lora_r = 8\nlearning_rate = 1e-3\nout_dir = "x"\n')
    (tmp_path / "b.py").write_text('base_config = "a.py"\nlora_r = 12\n')
    cfg = load_config(tmp_path / "b.py", ["--learning_rate=5e-4"])
    assert (cfg.lora_r, cfg.learning_rate, cfg.out_dir) == (12, 5e-4, "x")


def test_base_config_cycle_is_an_error(tmp_path):
    (tmp_path / "a.py").write_text('base_config = "b.py"\n')
    (tmp_path / "b.py").write_text('base_config = "a.py"\n')
    with pytest.raises(UserError, match="cycle"):
        load_config(tmp_path / "a.py")


@pytest.mark.parametrize(
    "arg, expected",
    [
        ("--lora_r=64", ("lora_r", 64)),
        ("--quantization=None", ("quantization", None)),
        ("--gradient_checkpointing=True", ("gradient_checkpointing", True)),
        ("--target_modules=['q_proj','v_proj']", ("target_modules", ["q_proj", "v_proj"])),
        ("--prompt_template=a=b {premise}", ("prompt_template", "a=b {premise}")),  # split at the first '='
        ("--model_name=mistralai/Mistral-7B-v0.3", ("model_name", "mistralai/Mistral-7B-v0.3")),
    ],
)
def test_override_parsing(arg, expected):
    assert parse_override(arg) == expected


def test_overrides_are_typed_and_ints_fill_floats():
    cfg = load_config(ROOT / "configs/tiny.py", ["--learning_rate=1", "--quantization=None", "--lora_r=64",
                                                 "--target_modules=['q_proj']"])
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.lora_r == 64 and cfg.quantization is None and cfg.target_modules == ["q_proj"]


def test_typo_names_the_key_and_suggests(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("lora_r = 4\nlerning_rate = 1e-4\n")
    with pytest.raises(UserError) as err:
        load_config(path)
    msg = str(err.value)
    assert f"{path.resolve()}:2" in msg and "'lerning_rate'" in msg and "did you mean 'learning_rate'" in msg


def test_wrong_types_name_key_value_and_expectation():
    with pytest.raises(UserError) as err:
        load_config(ROOT / "configs/tiny.py", ["--lora_r=abc", "--finetuning=half", "--gradient_checkpointing=3"])
    msg = str(err.value)
    assert "lora_r='abc'" in msg and "expected int" in msg
    assert "finetuning='half'" in msg and "'lora'" in msg
    assert "gradient_checkpointing=3" in msg and "expected bool" in msg


@pytest.mark.parametrize("bad", ["--lora_r=0", "--lora_dropout=1.5", "--warmup_ratio=2.0", "--batch_size=-1"])
def test_out_of_range_values_rejected(bad):
    with pytest.raises(UserError, match=bad[2:].split("=")[0]):
        load_config(ROOT / "configs/tiny.py", [bad])


def test_all_problems_reported_together_with_exit_2_and_no_traceback():
    r = run_app("config", "configs/tiny.py", "--lora_rr=3", "--learning_rate=fast", "--seed=1.5")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "'lora_rr'" in r.stderr and "did you mean 'lora_r'" in r.stderr
    assert "learning_rate='fast'" in r.stderr and "seed=1.5" in r.stderr


def test_missing_config_file_and_syntax_error(tmp_path):
    r = run_app("config", str(tmp_path / "nope.py"))
    assert r.returncode == 2 and "config file not found" in r.stderr
    bad = tmp_path / "bad.py"
    bad.write_text("lora_r = 4\nlora_alpha = (\n")
    r = run_app("config", str(bad))
    assert r.returncode == 2 and f"{bad}:" in r.stderr and "syntax error" in r.stderr and "Traceback" not in r.stderr


def test_config_command_prints_resolved_json():
    import json

    r = run_app("config", "configs/ablation1.py", "--lora_r=64")
    assert r.returncode == 0, r.stderr
    resolved = json.loads(r.stdout)
    assert resolved["lora_r"] == 64 and resolved["warmup_steps"] == 150 and set(resolved) == set(config_class("nli_cot").model_fields)


@pytest.mark.parametrize("task", ["nli_cot", "confidence_tokens", "confidence_head"])
def test_every_field_has_a_description(task):
    for name, field in config_class(task).model_fields.items():
        assert field.description, name


def test_task_settings_share_the_flat_namespace_and_stay_with_their_task(tmp_path):
    cfg = load_config(ROOT / "configs/confidence_tokens_tiny.py", ["--calib_beta=25", "--lora_r=64"])
    assert (cfg.calib_beta, cfg.lora_r) == (25, 64) and isinstance(cfg, Config)
    with pytest.raises(UserError) as err:  # a setting of another task names that task
        load_config(ROOT / "configs/tiny.py", ["--calib_beta=25", "--calib_bta=3"])
    msg = str(err.value)
    assert "'calib_beta' is a setting of task 'confidence_tokens', not of task 'nli_cot'" in msg
    with pytest.raises(UserError, match="did you mean 'calib_beta'"):  # suggestions come from both schemas
        load_config(ROOT / "configs/confidence_tokens_tiny.py", ["--calib_bta=3"])
    path = tmp_path / "c.py"
    path.write_text('task = "confidence_head"\nhead_dropout = 0.2\n')
    assert load_config(path).head_dropout == 0.2


def test_best_metric_is_one_the_task_declares():
    assert load_config(ROOT / "configs/tiny.py", ["--metric_for_best='accuracy'"]).metric_for_best == "accuracy"
    with pytest.raises(UserError, match=r"metric_for_best='pearson' is not a metric of task 'nli_cot'.*macro_f1"):
        load_config(ROOT / "configs/tiny.py", ["--metric_for_best='pearson'", "--lora_r=0"])
    assert load_config(ROOT / "configs/confidence_head_tiny.py", ["--metric_for_best='pearson'"]).metric_for_best == "pearson"


def test_config_list_groups_fields_by_section():
    r = run_app("config", "--list", "--task", "confidence_head")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for section in ("[Task and data]", "[Model]", "[Fine-tuning method]", "[Optimisation]", "[Evaluation]",
                    "[Run directory, logging and checkpoints]", "[Inference]", "[Task confidence_head"):
        assert section in out, section
    assert "head_hidden_sizes" in out and "calib_beta" not in out and "lora_r" in out
    assert "metric_for_best of task confidence_head: dev_loss (min)" in out
    assert run_app("config", "--list", "--task", "nli_cott").returncode == 2


OLD_RUN_CONFIG_KEYS = {  # a run_config.json as written before the task sections (every task's field in one schema)
    "task": "confidence_head", "head_metric_for_best": "pearson", "metric_for_best": "macro_f1",
    "confidence_tokens": {"boolq": ["<C_READ>", "<U_READ>"]}, "calib_beta": 50, "prompt_template": "{premise}",
    "step_marker": "<CONFIDENCE>", "lora_r": 8, "trust_remote_code": True,
}


def test_run_configs_from_before_the_task_sections_still_load(tmp_path):
    path = tmp_path / "run_config.json"
    import json

    path.write_text(json.dumps(OLD_RUN_CONFIG_KEYS))
    cfg = saved_config(path)
    assert (cfg.task, cfg.lora_r, cfg.metric_for_best, cfg.step_marker) == ("confidence_head", 8, "pearson", "<CONFIDENCE>")
    assert cfg.trust_remote_code is False  # widening trust never comes from a saved file
    assert saved_config(path, ["--trust_remote_code=True"]).trust_remote_code is True
    path.write_text(json.dumps({**OLD_RUN_CONFIG_KEYS, "task": "nli_cot"}))
    cfg = saved_config(path)
    assert cfg.metric_for_best == "macro_f1" and cfg.prompt_template == "{premise}"


# --- a model trained from scratch -------------------------------------------------------------------------------
def test_lookahead_configs_name_no_base_model_and_derive_the_sequence_length():
    """configs/lookahead*.py set neither model_name nor train_file nor max_seq_length: the from-scratch section sets
    them (no base model, the corpus, context_length + 2); a max_seq_length given is kept."""
    full, tiny = load_config(ROOT / "configs/lookahead.py"), load_config(ROOT / "configs/lookahead_tiny.py")
    assert (full.model_name, full.train_file, full.dev_file) == (None, full.corpus_file, full.corpus_file)
    assert (full.context_length, full.max_seq_length) == (128, 130)
    assert (tiny.context_length, tiny.max_seq_length) == (64, 66)
    other = load_config(ROOT / "configs/lookahead_tiny.py", ["--context_length=10", "--corpus_file=other.txt"])
    assert (other.max_seq_length, other.train_file, other.dev_file) == (12, "other.txt", "other.txt")
    assert load_config(ROOT / "configs/lookahead_tiny.py", ["--max_seq_length=80"]).max_seq_length == 80
    assert "model_name" not in (ROOT / "configs/lookahead.py").read_text(encoding="utf-8")


@pytest.mark.parametrize("override, message", [
    ("--model_name=from-scratch", "command line: model_name: task 'lookahead' sets it (no base model"),
    ("--train_file=data/lookahead/shakespeare.txt", "command line: train_file: task 'lookahead' sets it (corpus_file)"),
])
def test_lookahead_config_refuses_what_the_task_sets(override, message):
    with pytest.raises(UserError) as err:
        load_config(ROOT / "configs/lookahead.py", [override])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_fine_tuning_task_needs_its_base_model():
    with pytest.raises(UserError, match=r"^command line: model_name=None: task 'nli_cot' fine-tunes a base model"):
        load_config(ROOT / "configs/tiny.py", ["--model_name=None"])


def test_lookahead_run_configs_with_the_from_scratch_sentinel_still_load(tmp_path):
    """A run_config.json written when configs/lookahead.py named model_name="from-scratch", an informational
    train_file and max_seq_length by hand loads as the run it was: the same corpus, shape and sequence length."""
    import json

    old = {**load_config(ROOT / "configs/lookahead_tiny.py").model_dump(), "model_name": "from-scratch",
           "train_file": "data/lookahead/shakespeare.txt", "dev_file": "data/lookahead/shakespeare.txt",
           "corpus_file": str(tmp_path / "corpus.txt"), "max_seq_length": 66}
    path = tmp_path / "run_config.json"
    path.write_text(json.dumps(old), encoding="utf-8")
    cfg = saved_config(path)
    assert (cfg.model_name, cfg.train_file, cfg.dev_file) == (None, old["corpus_file"], old["corpus_file"])
    assert (cfg.context_length, cfg.max_seq_length, cfg.n_layer, cfg.d_model) == (64, 66, 2, 64)
    assert saved_config(path, ["--max_steps=7"]).max_steps == 7
