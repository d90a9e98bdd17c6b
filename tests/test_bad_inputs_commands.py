"""Every bad input of the commands added since the first table: ranking, experiment, plot, export, sample-data,
tiny-model, download, verify and config checks. One line, exit 2, nothing written, nothing existing changed.

The building blocks are those of tests/test_bad_inputs.py (`case`, `DIR`, `Ckpt`, `make_files`, `expand`, `tree`,
`run_in_process`); on top of its checks each row here compares the bytes of every file that was there before the
command with the bytes after it, so an output or side file written over an input (or over anything else) fails the
row. Placeholders besides that module's: {rank} (a tiny ranking checkpoint), {cfg_la} (configs/lookahead_tiny.py)
and {LA} (overrides that make the lookahead experiment a few seconds long, with its runs and results in the case's
folder). Every row runs with HF_HUB_OFFLINE=1 and with the Hub download refused: no row may reach the network.

Rows marked "was: ..." in a comment failed before the fix they guard; the others are their neighbours.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import pytest

from conftest import ROOT, run_app
from test_bad_inputs import (DEEP, DIR, Ckpt, assert_refused, case, checkpoints, expand, make_files,  # noqa: F401
                             run_in_process, tree)

# --- inputs of the rows --------------------------------------------------------------------------------------------
FINQA = json.dumps([{"id": "r1", "pre_text": ["Sales were 5 in 2019."], "post_text": [],
                     "table": [["year", "2019"], ["sales", "5"]],
                     "qa": {"question": "What is sales plus 2?", "program": "add(5, 2)", "exe_ans": 7.0}}])
PREPARED = json.dumps({"id": "a", "question": "q?", "context": "c", "gold_program": "add(1, 2)",
                       "gold_answer": 3.0}) + "\n"
CANDIDATES = (ROOT / "data/sample/ranking/dev.jsonl").read_text(encoding="utf-8").splitlines()[0] + "\n"
LA = ("--out_dir=runs --experiment_results_dir=results --corpus_file={root}/data/lookahead/shakespeare.txt "
      "--corpus_chars=20000 --max_steps=2 --experiment_seeds=[1] \"--experiment_models=['plain']\" --n_layer=1 "
      "--n_head=2 --d_model=32 --context_length=16 --max_seq_length=18 --batch_size=4 --micro_batch_size=4 "
      "--eval_every=2 --save_every=2 --log_every=1 --eval_rows=10 --tensorboard=False")
EXPERIMENT = "experiment {cfg_la} " + LA
OLD_PNG = b"\x89PNG a plot drawn earlier"


def run_record(perplexity: float) -> dict:
    """One run of a results JSON, as the experiment writes it (two history points, calibration pairs)."""
    return {"history": {"train": {"loss/lm": [[1, 3.0], [2, 2.5]]}, "eval": {"perplexity": [[2, perplexity]]},
                        "tokens_per_s": [[1, 100.0]]},
            "final": {"perplexity": perplexity, "parameters": {"total": 10},
                      "pairs": {"predicted": [1.0, 2.0], "actual": [1.5, 2.5]}},
            "wall_time_s": 1.0, "steps_to_target": 2, "tokens_per_s": 100.0, "final_train_lm_loss": 2.5}


def results_json(change=None) -> str:
    """A small valid results file, or one changed by `change(results)`."""
    from app.tasks.lookahead.experiment import summarise

    results = {"runs": {"plain": {"1": run_record(9.0)}, "confidence": {"1": run_record(8.0)}},
               "target_perplexity": 9.0}
    results["summary"] = summarise(results)
    if change is not None:
        results = copy.deepcopy(results)
        change(results)
    return json.dumps(results)


def without(*keys):
    """A change that deletes results[k0][k1]...[kn]."""
    def change(results):
        target = results
        for k in keys[:-1]:
            target = target[k]
        del target[keys[-1]]
    return change


def setting(value, *keys):
    def change(results):
        target = results
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
    return change


class Manifest:
    """The checkpoint copy `ckpt` of the case with one more manifest entry `entry` ({work} = the case's folder),
    listed with the true size and sha256 of the file it names, so that only where it points can fail."""

    def __init__(self, ckpt: str, entry: str):
        self.ckpt, self.entry = ckpt, entry

    def apply(self, work: Path) -> None:
        entry = self.entry.format(work=work)
        target = Path(entry) if Path(entry).is_absolute() else work / self.ckpt / entry
        path = work / self.ckpt / "manifest.json"
        manifest = json.loads(path.read_text())
        data = target.read_bytes()
        manifest["files"][entry] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        path.write_text(json.dumps(manifest))


CASES = [
    # --- ranking prepare | candidates | rewards ---------------------------------------------------------------------
    case("ranking-candidates-stats-on-input", "ranking candidates p.stats.json p.jsonl", {"p.stats.json": PREPARED}, 2, r"p\.stats\.json: is the input file, and the stats file of output p\.jsonl would overwrite it"),  # was: input overwritten
    case("ranking-rewards-stats-on-input", "ranking rewards c.stats.json c.jsonl", {"c.stats.json": CANDIDATES}, 2, r"c\.stats\.json: is the input file, and the stats file of output c\.jsonl"),  # was: input overwritten
    case("ranking-prepare-stats-on-input", "ranking prepare f.stats.json f.jsonl", {"f.stats.json": FINQA}, 2, r"f\.stats\.json: is the input file, and the stats file of output f\.jsonl"),  # was: input overwritten
    case("ranking-prepare-empty-list", "ranking prepare e.json p.jsonl", {"e.json": "[]\n"}, 2, r"e\.json: no FinQA records"),  # was: exit 0, 0 rows
    case("ranking-prepare-all-skipped", "ranking prepare b.json p.jsonl --rank_bad_records='skip'", {"b.json": FINQA.replace("add(5, 2)", "add(5, 2")}, 2, r"b\.json: all 1 records are bad"),  # was: exit 0, 0 rows
    case("ranking-prepare-bad-program", "ranking prepare b.json p.jsonl", {"b.json": FINQA.replace("add(5, 2)", "add(5, 2")}, 2, r"b\.json: record 0 \(r1\): qa\.program 'add\(5, 2' does not parse"),
    case("ranking-prepare-missing", "ranking prepare nope.json p.jsonl", {}, 2, r"nope\.json: file not found"),
    case("ranking-prepare-directory", "ranking prepare d.json p.jsonl", {"d.json": DIR}, 2, r"d\.json: is a directory"),
    case("ranking-prepare-empty-file", "ranking prepare f.json p.jsonl", {"f.json": ""}, 2, r"f\.json: file is empty"),
    case("ranking-prepare-broken-json", "ranking prepare f.json p.jsonl", {"f.json": FINQA[:-5]}, 2, r"f\.json(:\d+)?: .*JSON"),
    case("ranking-prepare-not-finqa", "ranking prepare f.json p.jsonl", {"f.json": '{"a": 1}\n'}, 2, r"f\.json: record 0 \(0\): missing 'qa'"),
    case("ranking-prepare-nested", "ranking prepare f.json p.jsonl", {"f.json": "[" + DEEP + "]"}, 2, r"f\.json(:\d+)?: .*(nested|JSON)"),
    case("ranking-prepare-output-is-input", "ranking prepare f.json f.json", {"f.json": FINQA}, 2, r"f\.json is the input file"),
    case("ranking-prepare-output-directory", "ranking prepare f.json out", {"f.json": FINQA, "out": DIR}, 2, r"out: is a directory"),
    case("ranking-prepare-output-under-file", "ranking prepare f.json F/p.jsonl", {"f.json": FINQA, "F": "x\n"}, 2, r"F/p\.jsonl: cannot create its folder: F is a file"),
    case("ranking-prepare-config-of-other-task", "ranking prepare f.json p.jsonl --config {cfg_tiny}", {"f.json": FINQA}, 2, r"tiny\.py: task='nli_cot'; the ranking commands need a ranking config"),
    case("ranking-prepare-unknown-override", "ranking prepare f.json p.jsonl --num_candidate=3", {"f.json": FINQA}, 2, r"unknown config key 'num_candidate' \(did you mean 'num_candidates'\?\)"),
    case("ranking-candidates-empty-array", "ranking candidates e.json c.jsonl", {"e.json": "[]\n"}, 2, r"e\.json: no data rows"),
    case("ranking-candidates-blank-lines", "ranking candidates p.jsonl c.jsonl", {"p.jsonl": "\n\n"}, 2, r"p\.jsonl: file is empty"),
    case("ranking-candidates-missing-column", "ranking candidates p.jsonl c.jsonl", {"p.jsonl": PREPARED.replace('"gold_program"', '"program"')}, 2, r"p\.jsonl:1: missing gold_program \(write this file with python -m app ranking prepare\)"),
    case("ranking-candidates-duplicate-id", "ranking candidates p.jsonl c.jsonl", {"p.jsonl": PREPARED * 2}, 2, r"p\.jsonl:2: duplicate id 'a' \(first on line 1\)"),
    case("ranking-rewards-no-candidates", "ranking rewards p.jsonl r.jsonl", {"p.jsonl": PREPARED}, 2, r"p\.jsonl:1: missing candidates"),
    case("ranking-rewards-candidates-not-list", "ranking rewards c.jsonl r.jsonl", {"c.jsonl": PREPARED.replace('"gold_answer"', '"candidates": 3, "gold_answer"')}, 2, r"c\.jsonl: row 0 \(a\): 'candidates' must be a list"),
    # --- ranking rank --------------------------------------------------------------------------------------------
    case("rank-metrics-on-input", "ranking rank r.metrics.json --checkpoint {rank} --output r.jsonl", {"r.metrics.json": CANDIDATES}, 2, r"r\.metrics\.json: is the input file, and the metrics file of output r\.jsonl would overwrite it"),  # was: input overwritten
    case("rank-partial-on-input", "ranking rank r.jsonl.partial.jsonl --checkpoint {rank} --output r.jsonl", {"r.jsonl.partial.jsonl": CANDIDATES}, 2, r"r\.jsonl\.partial\.jsonl: is the input file, and the partial file of output r\.jsonl"),  # was: input overwritten
    case("rank-output-is-input", "ranking rank c.jsonl --checkpoint {rank} --output c.jsonl", {"c.jsonl": CANDIDATES}, 2, r"--output c\.jsonl is the input file"),
    case("rank-output-metrics-name", "ranking rank c.jsonl --checkpoint {rank} --output r.metrics.json", {"c.jsonl": CANDIDATES}, 2, r"--output r\.metrics\.json: give the rankings JSONL path"),
    case("rank-output-under-file", "ranking rank c.jsonl --checkpoint {rank} --output F/r.jsonl", {"c.jsonl": CANDIDATES, "F": "x\n"}, 2, r"F/r\.jsonl: cannot create its folder: F is a file"),
    case("rank-missing-input", "ranking rank nope.jsonl --checkpoint {rank}", {}, 2, r"nope\.jsonl: file not found"),
    case("rank-directory-input", "ranking rank d.jsonl --checkpoint {rank}", {"d.jsonl": DIR}, 2, r"d\.jsonl: is a directory"),
    case("rank-empty-input", "ranking rank c.jsonl --checkpoint {rank}", {"c.jsonl": ""}, 2, r"c\.jsonl: file is empty"),
    case("rank-broken-jsonl", "ranking rank c.jsonl --checkpoint {rank}", {"c.jsonl": CANDIDATES + '{"id": \n'}, 2, r"c\.jsonl:2: broken JSON line"),
    case("rank-checkpoint-of-nli", "ranking rank c.jsonl --checkpoint {nli}", {"c.jsonl": CANDIDATES}, 2, r"trained for task='nli_cot'; this command needs a ranking checkpoint"),
    case("rank-checkpoint-missing", "ranking rank c.jsonl --checkpoint nock", {"c.jsonl": CANDIDATES}, 2, r"nock: checkpoint not found"),
    # --- experiment -----------------------------------------------------------------------------------------------
    case("experiment-n-head", EXPERIMENT + " --n_head=3", {}, 2, r"n_head=3: d_model=32 is not a multiple of it"),  # was: ValueError
    case("experiment-results-dir-file", EXPERIMENT + " --results-dir F", {"F": "x\n"}, 2, r"--results-dir F: is a file, not a directory"),  # was: failed after training
    case("experiment-results-dir-under-file", EXPERIMENT + " --results-dir F/r", {"F": "x\n"}, 2, r"--results-dir F/r: cannot create it, F is a file"),  # was: failed after training
    case("experiment-results-key-file", EXPERIMENT + " --experiment_results_dir=F", {"F": "x\n"}, 2, r"experiment_results_dir='F': is a file"),  # was: failed after training
    case("experiment-out-dir-under-file", EXPERIMENT + " --out_dir=F/runs", {"F": "x\n"}, 2, r"out_dir='F/runs': cannot create it, F is a file"),
    case("experiment-config-missing", "experiment nope.py", {}, 2, r"nope\.py: config file not found"),
    case("experiment-config-of-other-task", "experiment {cfg_tiny}", {}, 2, r"tiny\.py: task='nli_cot'; the experiment needs task='lookahead'"),
    case("experiment-corpus-missing", EXPERIMENT + " --corpus_file=nope.txt", {}, 2, r"nope\.txt: corpus file not found"),
    case("experiment-unknown-override", EXPERIMENT + " --n_heads=2", {}, 2, r"unknown config key 'n_heads' \(did you mean 'n_head'\?\)"),
    case("experiment-bad-argument", "experiment {cfg_la} extra", {}, 2, r"unexpected argument 'extra'"),
    # --- plot -----------------------------------------------------------------------------------------------------
    case("plot-no-models", "plot r.json", {"r.json": results_json(without("summary", "models")), "r_loss_curves.png": OLD_PNG}, 2, r"r\.json: summary\.models: missing"),  # was: KeyError, PNGs written
    case("plot-runs-list", "plot r.json", {"r.json": results_json(setting([1], "runs"))}, 2, r"r\.json: runs: expected an object, found \[1\]"),  # was: AttributeError
    case("plot-run-not-object", "plot r.json", {"r.json": results_json(setting(3, "runs", "plain", "1"))}, 2, r"r\.json: runs\.plain\.1: expected an object"),
    case("plot-history-missing", "plot r.json", {"r.json": results_json(without("runs", "plain", "1", "history"))}, 2, r"r\.json: runs\.plain\.1\.history: missing"),
    case("plot-series-not-pairs", "plot r.json", {"r.json": results_json(setting([[1, "x"]], "runs", "plain", "1", "history", "train", "loss/lm"))}, 2, r"r\.json: runs\.plain\.1\.history\.train\.loss/lm\[0\]: expected a \[step, value\] pair"),
    case("plot-pairs-differ", "plot r.json", {"r.json": results_json(setting([1.0], "runs", "confidence", "1", "final", "pairs", "actual"))}, 2, r"runs\.confidence\.1\.final\.pairs: predicted and actual differ in length"),
    case("plot-std-missing", "plot r.json", {"r.json": results_json(without("summary", "models", "plain", "perplexity", "std"))}, 2, r"summary\.models\.plain\.perplexity\.std: missing"),
    case("plot-wall-time-text", "plot r.json", {"r.json": results_json(setting("1s", "runs", "plain", "1", "wall_time_s"))}, 2, r"runs\.plain\.1\.wall_time_s: expected a number or null"),
    case("plot-no-runs", "plot r.json", {"r.json": results_json(setting({}, "runs"))}, 2, r"r\.json: runs: empty"),
    case("plot-json-array", "plot r.json", {"r.json": "[]\n"}, 2, r"r\.json: not a lookahead experiment results file"),
    case("plot-empty-file", "plot r.json", {"r.json": ""}, 2, r"r\.json: cannot read the results"),
    case("plot-broken-json", "plot r.json", {"r.json": results_json()[:-3]}, 2, r"r\.json: cannot read the results"),
    case("plot-nested", "plot r.json", {"r.json": "[" * 100000 + "]" * 100000}, 2, r"r\.json: cannot read the results"),
    case("plot-missing-file", "plot nope.json", {}, 2, r"nope\.json: file not found"),
    case("plot-directory", "plot d.json", {"d.json": DIR}, 2, r"d\.json.*is a directory"),
    # --- export ---------------------------------------------------------------------------------------------------
    case("export-output-under-file", "export {nli} --output F/sub", {"F": "x\n"}, 2, r"--output F/sub: cannot create it, F is a file"),  # was: NotADirectoryError
    case("export-output-is-file", "export {nli} --output F", {"F": "x\n"}, 2, r"--output F: is a file"),
    case("export-output-not-empty", "export {nli} --output out", {"out/keep.txt": "mine\n"}, 2, r"--output out: exists and is not an empty directory"),
    case("export-output-inside-checkpoint", "export ck --output ck/exported", {"ck": Ckpt("nli")}, 2, r"--output ck/exported: inside the checkpoint ck"),  # was: written into the checkpoint
    case("export-checkpoint-missing", "export nock --output out", {}, 2, r"nock: checkpoint not found"),
    case("export-checkpoint-is-file", "export F --output out", {"F": "x\n"}, 2, r"F: not a (checkpoint|directory)"),
    case("export-checkpoint-corrupt", "export ck --output out", {"ck": Ckpt("nli", corrupt="model.safetensors")}, 2, r"ck.*model\.safetensors"),
    case("export-unknown-override", "export {nli} --output out --lora_rr=4", {}, 2, r"did you mean 'lora_r'"),
    case("export-bad-argument", "export {nli} extra --output out", {}, 2, r"unexpected argument 'extra'"),
    case("export-no-output", "export {nli}", {}, 2, r"--output"),
    # --- sample-data / tiny-model -------------------------------------------------------------------------------
    case("sample-data-under-file", "sample-data nli_cot F/d", {"F": "x\n"}, 2, r"F/d: cannot create it, F is a file"),  # was: NotADirectoryError
    case("sample-data-lookahead-under-file", "sample-data lookahead F/d", {"F": "x\n"}, 2, r"F/d: cannot create it, F is a file"),  # was: NotADirectoryError
    case("sample-data-confidence-under-file", "sample-data confidence_tokens F/d/e", {"F": "x\n"}, 2, r"F/d/e: cannot create it, F is a file"),
    case("sample-data-ranking-under-file", "sample-data ranking F/d", {"F": "x\n"}, 2, r"F/d.*F is a file|F/d.*Not a directory"),
    case("sample-data-is-file", "sample-data nli_cot F", {"F": "x\n"}, 2, r"'F' is a file"),
    case("sample-data-unknown-task", "sample-data nli d", {}, 2, r"task='nli': unknown task"),
    case("tiny-model-under-file", "tiny-model F/m", {"F": "x\n"}, 2, r"F/m: cannot create it, F is a file"),  # was: FileExistsError
    case("tiny-model-is-file", "tiny-model F", {"F": "x\n"}, 2, r"'F' is a file"),
    case("tiny-model-exists", "tiny-model m", {"m/config.json": "{}"}, 2, r"m: already exists"),
    case("tiny-model-no-directory", "tiny-model", {}, 2, r"DIRECTORY"),
    # --- download (never the network) ---------------------------------------------------------------------------
    case("download-model-bad-name", "download model 'bad name!!'", {}, 2, r"bad name!!: neither a local directory nor a Hub repository id"),  # was: HFValidationError
    case("download-model-three-parts", "download model a/b/c", {}, 2, r"a/b/c: neither a local directory nor a Hub repository id"),  # was: HFValidationError
    case("download-model-missing-dir", "download model ./models/mine", {}, 2, r"\./models/mine: neither a local directory"),  # was: HFValidationError
    case("download-model-file", "download model F", {"F": "x\n"}, 2, r"F: is a file"),  # was: a Hub request for 'F'
    case("download-model-empty", "download model ''", {}, 2, r"model name is empty"),  # was: exit 0 ('' is the cwd)
    case("download-data-double-dash", "download data a--b/c", {}, 2, r"hf:a--b/c: not a Hub repository id"),  # was: HFValidationError
    case("download-data-bad-id", "download data 'bad name!!'", {}, 2, r"hf:bad name!!: not a Hub dataset id"),
    case("download-for-bad-model", "download --for c.py", {"c.py": "model_name = 'bad name!!'\n"}, 2, r"bad name!!: neither a local directory"),  # was: HFValidationError
    case("download-for-missing-config", "download --for nope.py", {}, 2, r"nope\.py: config file not found"),
    case("download-nothing", "download", {}, 2, r"give a subcommand"),
    # --- verify -----------------------------------------------------------------------------------------------------
    case("verify-manifest-parent-entry", "verify ck", {"ck": Ckpt("nli"), "outside.txt": "not the checkpoint's\n", "ck/manifest.json": Manifest("ck", "../outside.txt")}, 2, r"ck/manifest\.json: entry '\.\./outside\.txt' is outside the checkpoint"),  # was: read and hashed, ok
    case("verify-manifest-absolute-entry", "verify ck", {"ck": Ckpt("nli"), "outside.txt": "not the checkpoint's\n", "ck/manifest.json": Manifest("ck", "{work}/outside.txt")}, 2, r"ck/manifest\.json: entry '/.*outside\.txt' is outside the checkpoint"),  # was: read and hashed, ok
    case("verify-manifest-not-json", "verify ck", {"ck": Ckpt("nli"), "ck/manifest.json": "{"}, 2, r"ck/manifest\.json: unreadable checkpoint manifest"),
    case("verify-manifest-missing-file", "verify ck", {"ck": Ckpt("nli", drop=("config.json",))}, 2, r"ck/config\.json: missing, listed in manifest\.json"),
    case("verify-corrupt-weights", "verify ck", {"ck": Ckpt("nli", corrupt="model.safetensors")}, 2, r"ck/model\.safetensors: size"),
    case("verify-empty-run", "verify run", {"run/checkpoints": DIR}, 2, r"run/checkpoints: no checkpoints"),
    case("verify-missing", "verify nope", {}, 2, r"'nope' does not exist"),
    case("verify-file", "verify F", {"F": "x\n"}, 2, r"'F' is a file"),
    # --- config -----------------------------------------------------------------------------------------------------
    case("config-offload-without-fsdp", "config c.py", {"c.py": "fsdp_cpu_offload = True\n"}, 2, r"c\.py:1: fsdp_cpu_offload=True: .*needs parallelism='fsdp'"),  # was: accepted
    case("config-offload-override", "config {cfg_tiny} --fsdp_cpu_offload=True", {}, 2, r"command line: fsdp_cpu_offload=True: .*needs parallelism='fsdp'"),  # was: accepted
    case("config-offload-ddp", "config c.py", {"c.py": "parallelism = 'ddp'\nfsdp_cpu_offload = True\n"}, 2, r"c\.py:2: fsdp_cpu_offload=True: .*parallelism='ddp'"),  # was: accepted
]


# --- fixtures: test_bad_inputs' checkpoints and a ranking one --------------------------------------------------------
@pytest.fixture(scope="module")
def places(checkpoints, tiny_model_dir, tmp_path_factory) -> dict[str, str]:
    from app.config import load_config
    from app.train import train

    out = tmp_path_factory.mktemp("bad_inputs_rank") / "rank"
    cfg = load_config(ROOT / "configs/ranking_tiny.py", [
        f"--model_name={tiny_model_dir}", "--create_tiny_model=False", "--max_steps=2", "--warmup_steps=0",
        "--save_every=1000", "--tensorboard=False", "--dev_file=None", f"--out_dir={out}",
        f"--train_file={ROOT / 'data/sample/ranking/train.jsonl'}"])
    assert train(cfg) == 0
    return {**checkpoints, "rank": str(out / "checkpoints" / "final"),
            "cfg_la": str(ROOT / "configs/lookahead_tiny.py")}


def contents(where: Path) -> dict[str, bytes]:
    return {str(p.relative_to(where)): p.read_bytes() for p in where.rglob("*") if p.is_file()}


def refuse_hub_requests(monkeypatch) -> list:
    """Offline, and every snapshot download recorded and refused: a row may never reach the Hub."""
    import huggingface_hub

    requests = []

    def refused(repo_id, *args, **kwargs):
        requests.append(repo_id)
        raise AssertionError(f"Hub request for {repo_id!r}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refused)
    return requests


def prepare(work: Path, files: dict, ckpts: dict[str, str]) -> None:
    make_files(work, {k: v for k, v in files.items() if not isinstance(v, Manifest)}, ckpts)
    for v in files.values():
        if isinstance(v, Manifest):
            v.apply(work)


@pytest.mark.parametrize("args, files, code, pattern, leaves, sub", CASES)
def test_bad_input(args, files, code, pattern, leaves, sub, places, tmp_path, monkeypatch, capsys):
    work = tmp_path / "case"
    work.mkdir()
    prepare(work, files, places)
    before, before_bytes = tree(work), contents(work)
    argv = expand(args, places)
    monkeypatch.chdir(work)
    requests = refuse_hub_requests(monkeypatch)
    got, err = run_in_process(argv, capsys)
    monkeypatch.undo()
    assert not requests, f"a Hub request was made: {requests}"
    assert_refused(got, err, code, pattern, work, before, leaves)
    after = contents(work)
    changed = sorted(k for k, v in before_bytes.items() if after.get(k) != v)
    assert not changed, f"changed or removed: {changed}"


def test_the_table_covers_every_command():
    ids = [p.id for p in CASES]
    assert len(ids) == len(set(ids))
    commands = {p.values[0].split()[0] for p in CASES}
    assert {"ranking", "experiment", "plot", "export", "sample-data", "tiny-model", "download", "verify",
            "config"} <= commands
    assert {p.values[0].split()[1] for p in CASES if p.values[0].startswith("ranking ")} == {
        "prepare", "candidates", "rewards", "rank"}


# --- the same checks in a real process ------------------------------------------------------------------------------
def test_bad_download_name_in_a_subprocess_is_one_line(tmp_path):
    done = run_app("download", "model", "bad name!!", cwd=tmp_path, env={"HF_HUB_OFFLINE": "1",
                                                                        "HF_HOME": str(tmp_path / "hf")})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1].startswith("error: bad name!!: neither a local directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- behaviour that goes with the rows ------------------------------------------------------------------------------
def test_offload_without_fsdp_is_listed_with_the_other_problems(tmp_path):
    from app.config import load_config
    from app.errors import UserError

    path = tmp_path / "c.py"
    path.write_text("lora_r = 'eight'\nfsdp_cpu_offload = True\n")
    with pytest.raises(UserError) as err:
        load_config(path, ["--max_steps=many"])
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid config:" and len(lines) == 4
    assert any(re.search(r"c\.py:2: fsdp_cpu_offload=True: .*parallelism='fsdp'", line) for line in lines)
    assert load_config(path, ["--lora_r=8", "--parallelism='fsdp'"]).fsdp_cpu_offload is True


def test_plot_draws_a_valid_results_file(tmp_path, capsys):
    from app.__main__ import main

    (tmp_path / "r.json").write_text(results_json())
    assert main(["plot", str(tmp_path / "r.json")]) == 0, capsys.readouterr().err
    for kind in ("loss_curves", "calibration", "time"):
        assert (tmp_path / f"r_{kind}.png").read_bytes()[:4] == b"\x89PNG"
    assert "perplexity" in capsys.readouterr().out


def test_finished_experiment_is_reported_not_written_again(tmp_path, monkeypatch, capsys):
    """A re-run of a finished experiment with the same settings prints its results and writes nothing; a changed
    setting gives new results beside them; a deleted plot is drawn again."""
    import shlex

    from app.__main__ import main

    monkeypatch.chdir(tmp_path)
    argv = ["experiment", str(ROOT / "configs/lookahead_tiny.py"), *shlex.split(LA.format(root=ROOT))]
    assert main(argv) == 0, capsys.readouterr().err
    first = contents(tmp_path / "results")
    (result,) = [k for k in first if k.endswith("_results.json")]
    assert len(first) == 4  # the results and three plots
    capsys.readouterr()

    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"results: results/{result} (up to date" in out
    assert contents(tmp_path / "results") == first

    plot = next(k for k in first if k.endswith("_time.png"))
    (tmp_path / "results" / plot).unlink()
    assert main(argv) == 0
    again = contents(tmp_path / "results")
    assert set(again) == set(first) and {k: v for k, v in again.items() if k != plot} == {
        k: v for k, v in first.items() if k != plot}

    assert main([*argv, "--eval_batch_size=8"]) == 0  # evaluated differently: new results, the old ones kept
    after = contents(tmp_path / "results")
    assert len([k for k in after if k.endswith("_results.json")]) == 2
    assert {k: after[k] for k in again} == again
