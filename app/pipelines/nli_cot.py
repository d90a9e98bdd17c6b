"""NLI chain-of-thought: cot generate (an OpenAI-compatible server), reflect, combine, train, infer test, score dev.

tiny: a teacher (the tiny model trained briefly on the bundled sample) is served by `transformers serve`, with a chat
template that puts the cot prompt's premise and hypothesis into the prompt it was trained on; cot generate asks it for
the reasoning of 24 raw rows, reflect re-asks the wrong ones with the gold label, combine keeps what is right, and a
fresh tiny model (the student) trains on that, predicts the test set and is scored on dev.
full: the Mistral API (configs/cot_mistral.py, MISTRAL_API_KEY) on data/train_raw.csv, then configs/default.py
(Mistral-7B QLoRA) on one GPU.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from app.atomic import write_atomic
from app.data import csv_text
from app.pipelines.common import ROOT, final_of, predict, report, tiny_model, train
from app.pipelines.serve import API_KEY_ENV, transformers_serve
from app.pipelines.steps import Pipeline, Step

RAW_ROWS = 24
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def chat_template(prompt_template: str) -> str:
    """A chat template that answers a cot message holding <premise>/<hypothesis> tags with the NLI prompt the teacher
    was trained on (any other message is passed as it is)."""
    def field(tag):
        return "{{ m.split('<%s>')[1].split('</%s>')[0] }}" % (tag, tag)

    body = prompt_template.replace("{premise}", field("premise")).replace("{hypothesis}", field("hypothesis"))
    # no whitespace control around the body: the prompt ends in "Answer: ", whose space the teacher was trained after
    return ("{%- set m = messages[-1]['content'] -%}{{ bos_token }}"
            "{% if '<premise>' in m and '<hypothesis>' in m %}" + body + "{% else %}{{ m }}{% endif %}")


def write_serve_model(teacher: Path, out: Path, cot: Path | None = None) -> None:
    """The teacher's final weights and tokenizer, with the chat template, as a directory transformers serve loads.
    The reply caches in `cot` go: a request to a new teacher reads the same as one to the old (same model path)."""
    for cache in cot.glob("*.cache.jsonl") if cot is not None and cot.is_dir() else []:
        cache.unlink()
    final = teacher / "checkpoints" / "final"
    out.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if (final / name).is_file():
            shutil.copyfile(final / name, out / name)
    prompt = json.loads((final / "run_config.json").read_text(encoding="utf-8"))["prompt_template"]
    tok = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok["chat_template"] = chat_template(prompt)
    write_atomic(out / "tokenizer_config.json", json.dumps(tok, indent=1))


def write_raw_rows(train_csv: Path, out: Path, n: int) -> None:
    """The first n rows of the sample's training set without their reasoning: what cot generate starts from."""
    with open(train_csv, encoding="utf-8", newline="") as f:
        rows = [r for _, r in zip(range(n), csv.DictReader(f))]
    cols = ["premise", "hypothesis", "label"]
    write_atomic(out, csv_text(cols, [[r[c] for c in cols] for r in rows]))


def build(scale: str, work: Path, data: Path | None = None) -> Pipeline:
    return tiny(work) if scale == "tiny" else full(work, data or ROOT / "data")


def _cot(step: str, src: Path, out: Path, *settings: str, expect_s: float, server: bool = False, env=None) -> Step:
    return Step(step, ["cot", step, str(src), f"--output={out}", *settings], [src], [out], expect_s,
                server=server, env=env or {})


def _stats(cot: Path, *settings: str, expect_s: float) -> Step:
    """cot stats of the reflect output: first-pass accuracy, reflection success, thought lengths, cost."""
    return Step("stats", ["cot", "stats", str(cot / "reflected.csv"), f"--output={cot / 'stats.json'}", *settings],
                [cot / "reflected.csv"], [cot / "stats.json"], expect_s)


def _attachments(work: Path) -> dict[str, Path]:
    return {"Training data (cot stats)": work / "cot" / "stats.json", "Dev scores": work / "dev_scores.json"}


def _predict_and_score(work: Path, run: Path, test: Path, dev: Path, expect_s: float) -> list[Step]:
    return [predict("infer-test", ["infer"], test, run, work / "test_predictions.csv", expect_s, metrics=False),
            predict("infer-dev", ["infer"], dev, run, work / "dev_predictions.csv", expect_s, metrics=False),
            Step("score-dev", ["score", f"--pred={work / 'dev_predictions.csv'}", f"--gold={dev}",
                               f"--json={work / 'dev_scores.json'}"],
                 [work / "dev_predictions.csv", dev], [work / "dev_scores.json"], 2)]


def tiny(work: Path) -> Pipeline:
    data, cot, teacher, run, serve = work / "data", work / "cot", work / "teacher", work / "run", work / "serve-model"
    server = [f"--base_url={{server}}", f"--api_key_env={API_KEY_ENV}", f"--model={serve}", f"--reflect_model={serve}",
              "--structured_output=off", "--max_tokens=64", "--concurrency=4", "--progress=False"]
    key = {API_KEY_ENV: "local"}
    steps = [
        Step("sample-data", ["sample-data", "nli_cot", str(data)], [],
             [data / "train.csv", data / "dev.csv", data / "test.csv"], 3),
        tiny_model(work),
        train("teacher", "configs/tiny.py", teacher, [data / "train.csv"], 40, f"--train_file={data / 'train.csv'}",
              f"--dev_file={data / 'dev.csv'}", "--max_steps=60", "--eval_every=60", "--eval_rows=20",
              "--save_every=60", "--tensorboard=False", tiny_base=work / "base"),
        Step("serve-model", None, [final_of(teacher)], [serve / "model.safetensors", serve / "tokenizer_config.json"],
             1, run=lambda: write_serve_model(teacher, serve, cot),
             describe=f"copy {teacher}/checkpoints/final to {serve} with a chat template for transformers serve"),
        Step("raw-rows", None, [data / "train.csv"], [cot / "raw.csv"], 1,
             run=lambda: write_raw_rows(data / "train.csv", cot / "raw.csv", RAW_ROWS),
             describe=f"the first {RAW_ROWS} rows of {data / 'train.csv'} without reasoning -> {cot / 'raw.csv'}"),
        _cot("generate", cot / "raw.csv", cot / "generated.csv", *server, expect_s=60, server=True, env=key),
        _cot("reflect", cot / "generated.csv", cot / "reflected.csv", *server, expect_s=40, server=True, env=key),
        _cot("combine", cot / "reflected.csv", cot / "train.csv", expect_s=2),
        _stats(cot, f"--tokenizer={work / 'base'}", expect_s=5),
        train("train", "configs/tiny.py", run, [cot / "train.csv"], 30, f"--train_file={cot / 'train.csv'}",
              f"--dev_file={data / 'dev.csv'}", "--max_steps=40", "--batch_size=8", "--micro_batch_size=8",
              "--eval_every=20", "--eval_rows=40", "--save_every=20", "--tensorboard=False", tiny_base=work / "base"),
        *_predict_and_score(work, run, data / "test.csv", data / "dev.csv", 20),
        report(work, run, attach=_attachments(work)),
    ]
    for step in steps:  # the served teacher is the only server: generate and reflect wait for its files
        if step.server:
            step.inputs.append(serve / "model.safetensors")
    return Pipeline("nli_cot", "tiny", work, steps,
                    server=lambda: transformers_serve(serve, work / "serve.log"),
                    notes="tiny: a briefly trained tiny teacher behind transformers serve writes the reasoning")


def full(work: Path, data: Path) -> Pipeline:
    cot, run = work / "cot", work / "run"
    recipe = ["--config=configs/cot_mistral.py"]
    steps = [
        _cot("generate", data / "train_raw.csv", cot / "generated.csv", *recipe, expect_s=1800),
        _cot("reflect", cot / "generated.csv", cot / "reflected.csv", *recipe, expect_s=600),
        _cot("combine", cot / "reflected.csv", cot / "train.csv", *recipe, expect_s=5),
        _stats(cot, *recipe, expect_s=60),
        train("train", "configs/default.py", run, [cot / "train.csv"], 3 * 3600, f"--train_file={cot / 'train.csv'}",
              f"--dev_file={data / 'dev.csv'}"),
        *_predict_and_score(work, run, data / "test.csv", data / "dev.csv", 600),
        report(work, run, attach=_attachments(work)),
    ]
    return Pipeline("nli_cot", "full", work, steps,
                    notes="full: needs MISTRAL_API_KEY (configs/cot_mistral.py) and a GPU; times are estimates")
