"""Shared pieces of the GPU verification kit: run profiles, the context every part gets, fixtures, models, data, timing.

Nothing here imports torch, transformers or `app` at module level: `run.py` imports this module before it has
checked that those packages are installed.

Two profiles share every code path and differ only in shapes:

  cuda       one GPU (sized for an H200 and 8 minutes): a Mistral-7B-architecture model, sequence 512, 512 rows
  cpu-smoke  CPU, tiny shapes, under 2 minutes on 2 cores: proves the script runs, its figures mean nothing
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GPU_DIR = Path(__file__).resolve().parent
BENCH = ROOT / "tests" / "bench"
RECIPE = ROOT / "configs" / "default.py"  # the NLI recipe: QLoRA r=16 on q,k,v,o, sequence 512, micro batch 4 x 4

# Mistral-7B-v0.2 (sliding_window off, rope theta 1e6), vocabulary from the tokenizer (32,000 for the real one)
MISTRAL_7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128)
TINY = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16)


def use_repo_imports() -> None:
    """The repository root (package `app`), tests/bench (reused measuring code) and this folder on sys.path."""
    for path in (str(GPU_DIR), str(BENCH), str(ROOT)):
        if path not in sys.path:
            sys.path.insert(0, path)


# --- profiles -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    name: str
    cuda: bool
    budget_s: float  # parts and setups that would start past this are skipped (said in the output)
    matmul_n: int
    train_model: dict  # the recipe's model for training and inference
    train_steps: int  # optimizer steps per training setup
    train_skip: int  # warm-up steps left out of the timing window
    train_batch: dict  # batch_size / micro_batch_size overrides ({} = the recipe's 16 = 4 x 4)
    infer_rows: int
    infer_batch: int
    max_new_tokens: int
    eq_rows: int  # rows of the fp32 equality check
    conf_vocabs: tuple[int, ...]
    conf_shape: dict  # hidden, layers, seq, batch, steps of the confidence-token step
    resume_model: dict
    resume_steps: int
    resume_save_every: int
    resume_batch: dict
    unit_timeout_s: float  # one isolated unit (a subprocess) at most this long
    estimates_s: dict = field(default_factory=dict)  # rough cost of each unit, for the budget check

    def estimate(self, unit: str) -> float:
        return self.estimates_s.get(unit, 0.0)


CUDA_PROFILE = Profile(
    name="cuda", cuda=True, budget_s=450, matmul_n=8192,
    train_model={**MISTRAL_7B, "vocab_size": 32000}, train_steps=10, train_skip=2, train_batch={},
    infer_rows=512, infer_batch=128, max_new_tokens=48, eq_rows=64,
    conf_vocabs=(32000, 152000), conf_shape=dict(hidden=4096, layers=2, seq=512, batch=8, steps=5),
    resume_model=dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=128, vocab_size=32000),
    resume_steps=30, resume_save_every=5, resume_batch=dict(batch_size=8, micro_batch_size=4), unit_timeout_s=300,
    estimates_s={"write_model": 45, "engine": 25, "trl": 40, "infer": 90, "confidence": 35, "resume": 60},
)
SMOKE_PROFILE = Profile(
    # the smoke must not skip parts on a busy machine: ~2 min idle, 8.5 min at a load average of 14 on 2 cores, so
    # its budget and unit timeout are hang guards, not a schedule
    name="cpu-smoke", cuda=False, budget_s=3600, matmul_n=256,
    train_model={**TINY, "vocab_size": 32000}, train_steps=2, train_skip=1,
    train_batch=dict(batch_size=4, micro_batch_size=2),
    infer_rows=24, infer_batch=8, max_new_tokens=6, eq_rows=8,
    conf_vocabs=(32000, 152000), conf_shape=dict(hidden=32, layers=1, seq=32, batch=2, steps=1),
    resume_model={**TINY, "num_hidden_layers": 1, "vocab_size": 32000}, resume_steps=6, resume_save_every=2,
    resume_batch=dict(batch_size=4, micro_batch_size=2),
    unit_timeout_s=1200,
)


# --- results ------------------------------------------------------------------------------------------------------
def check(name: str, ok: bool, detail: str = "") -> dict:
    """One correctness check: a failed one makes the script exit non-zero."""
    return {"name": name, "ok": bool(ok), "detail": detail}


class UnitError(RuntimeError):
    """A unit (one measured setup) failed; the message ends with the tail of its log."""


# --- fixtures -----------------------------------------------------------------------------------------------------
@dataclass
class Fixtures:
    """Where the real tokenizer and NLI rows come from; `fallback` when ../shared is absent (figures then use the
    in-repo tiny tokenizer and the bundled sample rows, and say so)."""

    tokenizer: str | None
    nli: list[str]
    fallback: bool
    where: str


def find_fixtures() -> Fixtures:
    """$GPU_KIT_FIXTURES, else shared/fixtures inside the checkout (a copy carried to a machine that lacks the
    sibling folder), else ../shared/fixtures beside it."""
    chosen = os.environ.get("GPU_KIT_FIXTURES")
    candidates = [chosen, ROOT / "shared" / "fixtures", ROOT.parent / "shared" / "fixtures"]
    for c in candidates if chosen != "none" else ():  # "none": the fallback, as on a machine without fixtures
        if not c:
            continue
        base = Path(c)
        tok = base / "tokenizer" / "mistral-7b-instruct-v0.2"
        nli = [base / "nli" / n for n in ("dev_sample.csv", "NLI_trial.csv")]
        if (tok / "tokenizer.json").is_file() and nli[0].is_file():
            return Fixtures(str(tok), [str(p) for p in nli if p.is_file()], False, str(base))
    sample = ROOT / "data" / "sample"
    return Fixtures(None, [str(sample / "test.csv"), str(sample / "dev.csv")], True,
                    "none found: in-repo tiny tokenizer and data/sample (figures not representative)")


# --- context ------------------------------------------------------------------------------------------------------
@dataclass
class Context:
    """What every part and unit gets. Serialisable: an isolated unit rebuilds it from JSON in its own process."""

    profile: Profile
    work: str  # scratch: models, runs (removed at the end unless --keep)
    out: str  # results: JSON, table, logs
    fixtures: Fixtures
    isolate: bool  # run each unit in its own process (clean GPU memory and accelerate state)
    started: float
    python: str = sys.executable
    files: dict = field(default_factory=dict)  # shared artefacts made once: model dirs, the training CSV

    @property
    def device(self) -> str:
        return "cuda" if self.profile.cuda else "cpu"

    @property
    def work_path(self) -> Path:
        return Path(self.work)

    def elapsed(self) -> float:
        return time.time() - self.started

    def over_budget(self, unit: str) -> bool:
        """Would a unit of this kind end past the budget?"""
        return self.elapsed() + self.profile.estimate(unit) > self.profile.budget_s

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Context":
        data = json.loads(text)
        data["profile"] = Profile(**{**data["profile"], "conf_vocabs": tuple(data["profile"]["conf_vocabs"])})
        data["fixtures"] = Fixtures(**data["fixtures"])
        return cls(**data)

    # --- units --------------------------------------------------------------------------------------------------
    def unit(self, target: str, **kwargs):
        """Call `module:function(ctx, **kwargs)` (a module of this folder): in its own process when isolating, else
        here. Returns what it returns (JSON-able); any failure is a UnitError naming the unit and its log."""
        log_path = self._log_path(target, kwargs)
        if self.isolate:
            return self._unit_process(target, kwargs, log_path)
        module, func = target.split(":")
        with open(log_path, "w") as log:
            try:
                with contextlib.redirect_stdout(log):  # what a unit prints (the engine's summary line) goes to its log
                    return getattr(importlib.import_module(module), func)(self, **kwargs)
            except Exception as err:
                log.write(traceback.format_exc())
                line = (str(err).strip().splitlines() or [""])[0]
                raise UnitError(f"{target}: {type(err).__name__}: {line} (traceback in {log_path})") from err

    def _log_path(self, target: str, kwargs: dict) -> Path:
        """logs/<module.function.args>.log: each setup of a part gets its own."""
        shown = [str(v) for v in kwargs.values() if v is None or isinstance(v, (int, bool)) or
                 (isinstance(v, str) and len(v) < 20)]
        logs = Path(self.out) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        return logs / f"{safe_name('.'.join([target.replace(':', '.'), *shown]))}.log"

    def _unit_process(self, target: str, kwargs: dict, log_path: Path):
        ctx_file = self.work_path / f"ctx-{os.getpid()}.json"
        ctx_file.write_text(self.to_json())
        result = self.work_path / f"unit-{log_path.stem}.json"
        result.unlink(missing_ok=True)
        cmd = [self.python, str(GPU_DIR / "run.py"), "--unit", target, "--ctx", str(ctx_file),
               "--kwargs", json.dumps(kwargs), "--result", str(result)]
        with open(log_path, "w") as log:
            # its own process group: on a timeout the unit's children (training runs) go too, GPU memory with them
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=self.profile.unit_timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise UnitError(f"{target} ran past {self.profile.unit_timeout_s:.0f} s{log_tail(log_path)}") from None
        if rc != 0 or not result.is_file():
            raise UnitError(f"{target} exited {rc}{log_tail(log_path)}")
        return json.loads(result.read_text())


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)[:80]


def log_tail(path: Path, lines: int = 6) -> str:
    try:
        tail = [l for l in Path(path).read_text(errors="replace").splitlines() if l.strip()][-lines:]
    except OSError:
        return ""
    return f" (log {path}):\n    " + "\n    ".join(tail) if tail else f" (log {path} is empty)"


def run_unit_main(target: str, ctx_file: str, kwargs: str, result: str) -> int:
    """Entry point of an isolated unit process (run.py --unit)."""
    use_repo_imports()
    quiet_libraries()
    ctx = Context.from_json(Path(ctx_file).read_text())
    ctx.isolate = False  # a unit's own units run here
    module, func = target.split(":")
    try:
        out = getattr(importlib.import_module(module), func)(ctx, **json.loads(kwargs))
    except Exception:
        traceback.print_exc()
        return 1
    Path(result).write_text(json.dumps(out))
    return 0


def quiet_libraries() -> None:
    """Warnings only: the figures are what this script prints."""
    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("app", "transformers", "accelerate", "peft", "trl", "datasets", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR if name != "app" else logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    with contextlib.suppress(ImportError):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()


def importable(module: str) -> bool:
    """True when `module` imports (a broken install counts as absent)."""
    try:
        importlib.import_module(module)
    except Exception:  # bitsandbytes without its native library raises more than ImportError
        return False
    return True


# --- models and data ----------------------------------------------------------------------------------------------
def load_kit_tokenizer(ctx: Context, directory: str | None = None):
    """The real Mistral tokenizer as the runner loads it (pad distinct from EOS, no fixed padding), or the in-repo
    tiny one when the fixtures are absent."""
    from app.config import make_config
    from app.lm.modeling import load_tokenizer

    if directory is None and ctx.fixtures.tokenizer is None:
        from app.lm.tiny import build_tokenizer

        return build_tokenizer()
    return load_tokenizer(make_config(model_name=directory or ctx.fixtures.tokenizer))


def write_model(ctx: Context, which: str) -> str:
    """A random-weight Mistral-architecture model (`train` or `resume` shapes) with the kit's tokenizer, written
    once under the work dir as an ordinary Hugging Face directory; returns its path. Built on the device in the
    dtype it trains in (a 7B model built in fp32 on the host would take minutes)."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    out = ctx.work_path / f"model-{which}"
    if (out / "config.json").is_file():
        return str(out)
    shape = dict(ctx.profile.train_model if which == "train" else ctx.profile.resume_model)
    tok = load_kit_tokenizer(ctx)
    vocab = max(shape.pop("vocab_size"), len(tok))
    if ctx.fixtures.tokenizer is None:  # the tiny fallback tokenizer: a 32k head would generate ids it cannot decode
        vocab = len(tok)
    config = MistralConfig(vocab_size=vocab, max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6,
                           sliding_window=None, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **shape)
    dtype = torch.bfloat16 if ctx.profile.cuda else torch.float32
    torch.manual_seed(0)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(ctx.device):
            model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(before)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return str(out)


def ensure_model(ctx: Context, which: str) -> str:
    """The model directory of `which`, made once per run (in a unit of its own when isolating: its GPU memory is
    given back before anything is measured)."""
    key = f"model_{which}"
    if key not in ctx.files:
        ctx.files[key] = ctx.unit("kit:write_model", which=which)
    return ctx.files[key]


def nli_rows(ctx: Context) -> list[dict]:
    """The real NLI rows (premise, hypothesis, label) of the fixtures, in file order."""
    use_repo_imports()
    from app.data import read_rows

    rows = []
    for path in ctx.fixtures.nli:
        rows += [dict(r.values) for r in read_rows(path, ("premise", "hypothesis", "label"))]
    return rows


def thought_for(row: dict) -> str:
    """A three-step reasoning of the recipe's shape (the real training data's thoughts are written by an API model):
    it restates both texts, so example lengths follow the real premise and hypothesis lengths, and lands in the
    250-400 token range of the recipe's data for typical rows."""
    agree = int(row["label"]) == 1
    return (f"Step 1, what the premise establishes: {row['premise'].strip()} Nothing beyond this is stated, so only "
            f"these facts can be used. Step 2, what the hypothesis asserts: {row['hypothesis'].strip()} Every part of "
            "it has to be supported by the premise for entailment. Step 3, comparing the two: "
            + ("the facts line up, so the hypothesis follows from the premise without outside knowledge."
               if agree else "the facts do not line up, so the premise does not support the hypothesis."))


def write_train_csv(ctx: Context) -> str:
    """Training rows for the recipe: every real NLI row with a thought_process, as the NLI task reads them."""
    out = ctx.work_path / "nli_train.csv"
    if not out.is_file():
        rows = nli_rows(ctx)
        with open(out, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["premise", "hypothesis", "label", "thought_process"])
            writer.writeheader()
            for r in rows:
                writer.writerow({"premise": r["premise"], "hypothesis": r["hypothesis"], "label": int(r["label"]),
                                 "thought_process": thought_for(r)})
    return str(out)


def config_args(values: dict) -> list[str]:
    """`--key=value` overrides as the command line takes them (strings quoted, None as None)."""
    return [f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}" for k, v in values.items()]


def recipe_overrides(ctx: Context, model_dir: str, out_dir: str, **extra) -> dict:
    """The NLI recipe (configs/default.py) on the kit's model and rows; on CPU in fp32 (no bf16 autocast there)."""
    values = {"model_name": model_dir, "train_file": ctx.files["train_csv"], "dev_file": None, "out_dir": out_dir,
              "tensorboard": False, "log_every": 1, "save_every": 10**6}
    if not ctx.profile.cuda:
        values.update(dtype="float32", mixed_precision="no", bnb_4bit_compute_dtype="float32")
    values.update(extra)
    return values


def recipe_config(ctx: Context, model_dir: str, out_dir: str, **extra):
    from app.config import load_config

    return load_config(RECIPE, config_args(recipe_overrides(ctx, model_dir, out_dir, **extra)))


# --- timing and memory --------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def timed(device: str, fn):
    """(result, wall seconds): the device is synchronised before and after, so queued kernels count."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def reset_peak(device: str) -> None:
    if device == "cuda":
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    """torch.cuda.max_memory_allocated since the last reset, GiB (None on CPU: the smoke's memory means nothing)."""
    if device != "cuda":
        return None
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def allocated_gib(device: str) -> float | None:
    if device != "cuda":
        return None
    import torch

    return round(torch.cuda.memory_allocated() / 2**30, 3)


def free_memory(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def read_metrics(out_dir: str | Path) -> dict[int, dict]:
    """step -> merged values of a run's metrics.jsonl (tests/conftest.py has the same for pytest; this folder must
    run where pytest is not installed)."""
    merged: dict[int, dict] = {}
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        merged.setdefault(entry.pop("step"), {}).update(entry)
    return merged
