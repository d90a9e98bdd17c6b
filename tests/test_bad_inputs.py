"""Every bad input is one line, exit 2, nothing half-written: one table of cases across every command.

Each case runs `python -m app ARGS` (in-process through `app.__main__.main`, a few in a real subprocess) in a temp
directory holding the case's files, and checks: exit code 2, the last non-empty stderr line starts with `error: ` and
matches the case's pattern, no `Traceback`, and no file or folder left behind that was not there before (no
`*.partial.jsonl`, no `*.tmp`, no half-created run directory; a case lists the few paths a command is documented to
leave). Placeholders in the arguments: {root} (the checkout), {nli} (a tiny nli_cot checkpoint), {ch} (a tiny
confidence_head checkpoint), {model} (the tiny model), {cfg_*} (shipped configs), {T} / {CH} (overrides that point a
training run at this case's directory and at no model, so a data error must come before any model loads).

Every case must pass: a case that fails is a regression in the command it names.
"""

from __future__ import annotations

import builtins
import io
import json
import re
import shlex
from pathlib import Path

import pytest

from conftest import ROOT, SHARED, run_app

# --- building blocks of the table -----------------------------------------------------------------------------------
DIR = object()  # a file entry that is a directory


class Unreadable:
    """A file whose read is refused (PermissionError), as for a file without read permission; tests run as root, where
    chmod 000 does not stop a read, so open() is refused for that path instead."""

    def __init__(self, content: str | bytes = "x\n"):
        self.content = content


class Ckpt:
    """A copy of the module's {kind} checkpoint with one file overwritten by garbage (`corrupt`) or removed (`drop`)."""

    def __init__(self, kind: str, corrupt: str | None = None, drop: tuple[str, ...] = ()):
        self.kind, self.corrupt, self.drop = kind, corrupt, drop




def case(id_, args, files, code, pattern, leaves=(), marks=(), sub=False):
    return pytest.param(args, files, code, pattern, tuple(leaves), sub, id=id_, marks=marks)


NLI = "premise,hypothesis,label\n"
ROW = "A cat sleeps.,An animal sleeps.,1\n"
J = '{"premise": "p", "hypothesis": "h", "label": 1}\n'
DEEP = '{"premise": ' + "[" * 10000 + "]" * 10000 + ', "hypothesis": "h", "label": 1}\n'
STEP = json.dumps({"problem": "2+2?", "steps": ["Add them.", "It is 4."], "labels": [1.0, 1.0]}) + "\n"
QA = json.dumps({"question": "Is the sky blue?", "passage": "It is.", "answer": True, "dataset": "boolq"}) + "\n"
T = "--model_name=/nonexistent/no-model --create_tiny_model=False --out_dir=run --dev_file=None --tensorboard=False"
CH = T
CKPT_FILES = {"ck/run_config.json": "{}", "ck/config.json": "{}"}


def prm(rating=1, last_completions="[]") -> str:
    """One PRM800K record (original schema, one line)."""
    steps = [{"completions": [{"text": "Let x be the price.", "rating": 1, "flagged": False}],
              "human_completion": None, "chosen_completion": 0},
             {"completions": [{"text": "Then x = 29.", "rating": rating, "flagged": False}],
              "human_completion": None, "chosen_completion": 0}]
    rec = {"question": {"problem": "What is the price?", "ground_truth_answer": "29"},
           "label": {"steps": steps, "total_time": 1, "finish_reason": "solution"}}
    return json.dumps(rec) + "\n"


CASES = [
    # --- config files (config / train) ------------------------------------------------------------------------------
    case("config-syntax-error", "config c.py", {"c.py": "lora_r = 8\nlora_alpha = (\n"}, 2, r"c\.py:2: syntax error"),
    case("config-unknown-key", "config c.py", {"c.py": "lora_rr = 8\n"}, 2, r"c\.py:1: unknown config key 'lora_rr' \(did you mean 'lora_r'\?\)"),
    case("config-wrong-type", "config c.py", {"c.py": "lora_r = 'abc'\n"}, 2, r"c\.py:1: lora_r='abc': .*expected int"),
    case("config-sys-exit", "config c.py", {"c.py": "import sys\nlora_r = 8\nsys.exit(0)\n"}, 2, r"c\.py:3: .*exit"),
    case("config-sys-exit-train", "train c.py", {"c.py": "raise SystemExit(0)\n"}, 2, r"c\.py:1: .*exit"),
    case("config-raises", "config c.py", {"c.py": "lora_r = 8\nraise ValueError('boom')\n"}, 2, r"c\.py:2: ValueError: boom"),
    case("config-recursion", "config c.py", {"c.py": "def f():\n    return f()\nx = f()\n"}, 2, r"c\.py:\d+: RecursionError"),
    case("config-latin1", "config c.py", {"c.py": "# caf\xe9\nlora_r = 8\n".encode("latin-1")}, 2, r"c\.py(:1)?: .*(UTF-8|utf-8|decode)"),
    case("config-nul-byte", "config c.py", {"c.py": b"lora_r = 8\x00\n"}, 2, r"c\.py:1: .*null bytes"),
    case("config-missing", "config nope.py", {}, 2, r"nope\.py: config file not found"),
    case("config-directory", "config cdir", {"cdir": DIR}, 2, r"cdir: .*(directory|not found)"),
    case("config-unreadable", "config c.py", {"c.py": Unreadable("lora_r = 8\n")}, 2, r"c\.py: .*(Permission denied|cannot read)"),
    case("config-missing-base", "config c.py", {"c.py": "base_config = 'nobase.py'\n"}, 2, r"nobase\.py: config file not found"),
    case("config-base-cycle", "config a.py", {"a.py": "base_config = 'b.py'\n", "b.py": "base_config = 'a.py'\n"}, 2, r"a\.py: base_config cycle"),
    case("config-base-not-str", "config c.py", {"c.py": "base_config = 3\n"}, 2, r"c\.py:1: base_config must be a path string"),
    case("config-empty-out-dir", "config {cfg_tiny} --out_dir=", {}, 2, r"out_dir"),
    case("config-override-no-value", "config {cfg_tiny} --lora_r", {}, 2, r"'--lora_r'.*(must look like|take the form) --name=value"),
    case("config-override-unknown", "config {cfg_tiny} --lora_rr=64", {}, 2, r"command line: unknown config key 'lora_rr'"),
    case("config-override-type", "config {cfg_tiny} --learning_rate=abc", {}, 2, r"command line: learning_rate='abc'"),
    case("config-no-file", "config", {}, 2, r"(usage: python -m app config|give CONFIG\.py)"),
    case("train-config-syntax", "train c.py", {"c.py": "x = [\n"}, 2, r"c\.py:1: syntax error"),
    case("train-config-wrong-type", "train {cfg_tiny} --max_steps=many", {}, 2, r"command line: max_steps='many'"),
    case("train-config-latin1", "train c.py", {"c.py": "base_config = 'x.py'  # \xe9t\xe9\n".encode("latin-1")}, 2, r"c\.py(:1)?: .*(UTF-8|utf-8|decode)", sub=True),
    case("train-empty-out-dir", "train {cfg_tiny} --train_file=d.csv " + T + " --out_dir=", {"d.csv": NLI + ROW}, 2, r"out_dir"),
    case("train-empty-out-dir-fresh", "train {cfg_tiny} --train_file=d.csv " + T + " --out_dir= --resume=fresh", {"d.csv": NLI + ROW, "checkpoints/other/checkpoints/final/trainer_state.json": "{}"}, 2, r"out_dir"),
    case("train-fresh-model-fails", "train {cfg_tiny} --train_file=d.csv --resume=fresh " + T, {"d.csv": NLI + ROW, "run/checkpoints/step_0000001/trainer_state.json": "{}", "run/run_config.json": "{}"}, 2, r"no-model"),
    case("train-model-not-found", "train {cfg_tiny} --train_file=d.csv " + T, {"d.csv": NLI + ROW}, 2, r"cannot load tokenizer '/nonexistent/no-model'"),
    case("train-model-dir-not-a-model", "train {cfg_tiny} --train_file=d.csv " + T.replace("/nonexistent/no-model", "{root}/configs"), {"d.csv": NLI + ROW}, 2, r"(cannot load tokenizer|no tokenizer files)"),
    case("config-sys-exit-subprocess", "config c.py", {"c.py": "import sys\nsys.exit(0)\n"}, 2, r"c\.py:2: .*exit", sub=True),
    case("train-accumulation", "train {cfg_tiny} --batch_size=16 --micro_batch_size=5 " + T + " --train_file=d.csv", {"d.csv": NLI + ROW}, 2, r"batch_size"),
    # --- data files (train, nli_cot) -------------------------------------------------------------------------------
    case("data-empty", "train {cfg_tiny} --train_file=d.csv " + T, {"d.csv": ""}, 2, r"d\.csv: file is empty"),
    case("data-header-only", "train {cfg_tiny} --train_file=d.csv " + T, {"d.csv": NLI}, 2, r"d\.csv: no data rows"),
    case("data-missing-column", "train {cfg_tiny} --train_file=d.csv " + T, {"d.csv": "premise,label\np,1\n"}, 2, r"d\.csv:1: missing column\(s\) hypothesis"),
    case("data-bad-label", "train {cfg_tiny} --train_file=d.csv " + T, {"d.csv": NLI + ROW + "p,h,7\n"}, 2, r"d\.csv:3: label must be 0 or 1, found '7'", sub=True),
    case("data-label-float", "train {cfg_tiny} --train_file=d.jsonl " + T, {"d.jsonl": J + '{"premise": "p", "hypothesis": "h", "label": 0.5}\n'}, 2, r"d\.jsonl:2: label must be 0 or 1, found 0\.5"),
    case("data-undecodable", "train {cfg_tiny} --train_file=d.csv " + T, {"d.csv": (NLI + ROW).encode() + b"p\xff,h,0\n"}, 2, r"d\.csv:3: not valid UTF-8"),
    case("data-broken-jsonl", "train {cfg_tiny} --train_file=d.jsonl " + T, {"d.jsonl": J + '{"premise": "p",\n' + J}, 2, r"d\.jsonl:2: broken JSON line"),
    case("data-jsonl-not-object", "train {cfg_tiny} --train_file=d.jsonl " + T, {"d.jsonl": J + "[1, 2]\n"}, 2, r"d\.jsonl:2: expected a JSON object"),
    case("data-jsonl-huge-int", "train {cfg_tiny} --train_file=d.jsonl " + T, {"d.jsonl": J + '{"premise": "p", "hypothesis": "h", "label": ' + "1" * 5000 + "}\n"}, 2, r"d\.jsonl:2: broken JSON"),
    case("data-json-array-unclosed", "train {cfg_tiny} --train_file=d.json " + T, {"d.json": "[\n" + J + ",\n"}, 2, r"d\.json:\d+: (JSON array not closed|broken JSON)"),
    case("data-duplicate-header", "train {cfg_tiny} --train_file=d.csv " + T, {"d.csv": "premise,hypothesis,label,premise\np,h,1,q\n"}, 2, r"d\.csv:1: column 'premise' appears more than once"),
    case("data-nested-10000", "train {cfg_tiny} --train_file=d.jsonl " + T, {"d.jsonl": J + DEEP}, 2, r"d\.jsonl:2: JSON nested too deeply"),
    case("data-nested-array", "train {cfg_tiny} --train_file=d.json " + T, {"d.json": "[\n" + J + "," + DEEP + "]\n"}, 2, r"d\.json:3: JSON nested too deeply"),
    case("data-field-count", "train {cfg_tiny} --train_file=d.csv " + T, {"d.csv": NLI + ROW + "p,h,1,extra\n"}, 2, r"d\.csv:3: expected 3 fields"),
    case("data-directory", "train {cfg_tiny} --train_file=d.csv " + T, {"d.csv": DIR}, 2, r"d\.csv: is a directory, not a file"),
    case("data-missing", "train {cfg_tiny} --train_file=nope.csv " + T, {}, 2, r"nope\.csv: file not found"),
    case("data-unreadable", "train {cfg_tiny} --train_file=d.csv " + T, {"d.csv": Unreadable(NLI + ROW)}, 2, r"d\.csv: cannot read \(Permission denied\)"),
    case("data-dev-bad-label", "train {cfg_tiny} --train_file=d.csv " + T.replace("--dev_file=None", "--dev_file=dev.csv"), {"d.csv": NLI + ROW, "dev.csv": NLI + "p,h,yes\n"}, 2, r"dev\.csv:2: label must be 0 or 1, found 'yes'"),
    case("data-resume-fresh-bad-data", "train {cfg_tiny} --train_file=d.csv --resume=fresh " + T, {"d.csv": NLI + "p,h,3\n", "run/checkpoints/step_0000001/trainer_state.json": "{}", "run/run_config.json": "{}"}, 2, r"d\.csv:2: label must be 0 or 1"),
    # --- confidence_head training: step data, PRM800K ------------------------------------------------------------
    case("steps-train-rating-list", "train {cfg_ch} --train_file=p.jsonl " + CH, {"p.jsonl": prm() + prm(rating=[1])}, 2, r"p\.jsonl:2: label\.steps\[1\]: rating must be -1, 0, 1 or null, found \[1\]"),
    case("steps-train-rating-str", "train {cfg_ch} --train_file=p.jsonl " + CH, {"p.jsonl": prm(rating="good")}, 2, r"p\.jsonl:1: label\.steps\[1\]: rating must be"),
    case("steps-train-completions-str", "train {cfg_ch} --train_file=p.jsonl " + CH, {"p.jsonl": prm().replace('"completions": [{"text": "Then', '"completions": "x", "was": [{"text": "Then')}, 2, r"p\.jsonl:1: label\.steps\[1\]: completions must be a list or null"),
    case("steps-train-label-range", "train {cfg_ch} --train_file=s.jsonl " + CH, {"s.jsonl": STEP + STEP.replace("[1.0, 1.0]", "[1.0, 2]")}, 2, r"s\.jsonl:2: labels\[1\] = 2 is outside \[0, 1\]"),
    case("steps-train-marker", "train {cfg_ch} --train_file=s.jsonl " + CH, {"s.jsonl": STEP.replace("Add them.", "Add <CONFIDENCE> them.")}, 2, r"s\.jsonl:1: steps\[0\] contains the step marker"),
    case("steps-train-unknown-format", "train {cfg_ch} --train_file=s.jsonl " + CH, {"s.jsonl": J}, 2, r"s\.jsonl: cannot tell the format"),
    case("steps-train-nested", "train {cfg_ch} --train_file=s.jsonl " + CH, {"s.jsonl": STEP + DEEP}, 2, r"s\.jsonl:2: JSON nested too deeply"),
    # --- infer ------------------------------------------------------------------------------------------------------
    case("infer-empty", "infer d.csv --checkpoint {nli} --output o.csv", {"d.csv": ""}, 2, r"d\.csv: file is empty"),
    case("infer-missing-column", "infer d.csv --checkpoint {nli} --output o.csv", {"d.csv": "premise\np\n"}, 2, r"d\.csv:1: missing column\(s\) hypothesis"),
    case("infer-bad-label", "infer d.csv --checkpoint {nli} --output o.csv", {"d.csv": NLI + "p,h,maybe\n"}, 2, r"d\.csv:2: label must be 0 or 1"),
    case("infer-undecodable", "infer d.csv --checkpoint {nli} --output o.csv", {"d.csv": b"premise,hypothesis\n\xc3(,h\n"}, 2, r"d\.csv:2: not valid UTF-8"),
    case("infer-broken-jsonl", "infer d.jsonl --checkpoint {nli} --output o.csv", {"d.jsonl": J + "{premise: 1}\n"}, 2, r"d\.jsonl:2: broken JSON line"),
    case("infer-duplicate-header", "infer d.csv --checkpoint {nli} --output o.csv", {"d.csv": "premise,hypothesis,hypothesis\np,h,i\n"}, 2, r"d\.csv:1: column 'hypothesis' appears more than once"),
    case("infer-nested", "infer d.jsonl --checkpoint {nli} --output o.csv", {"d.jsonl": DEEP}, 2, r"d\.jsonl:1: JSON nested too deeply"),
    case("infer-directory-input", "infer d.csv --checkpoint {nli} --output o.csv", {"d.csv": DIR}, 2, r"d\.csv: is a directory, not a file"),
    case("infer-missing-input", "infer nope.csv --checkpoint {nli} --output o.csv", {}, 2, r"nope\.csv: file not found"),
    case("infer-output-is-directory", "infer d.csv --checkpoint {nli} --output out", {"d.csv": NLI + ROW, "out": DIR}, 2, r"out: .*directory"),
    case("infer-output-under-file", "infer d.csv --checkpoint {nli} --output f/o.csv", {"d.csv": NLI + ROW, "f": "a file\n"}, 2, r"f/o\.csv: .*(folder|directory|file)"),
    case("infer-output-is-input", "infer d.csv --checkpoint {nli} --output d.csv", {"d.csv": NLI + ROW}, 2, r"--output d\.csv is the input file"),
    case("infer-output-jsonl", "infer d.csv --checkpoint {nli} --output o.jsonl", {"d.csv": NLI + ROW}, 2, r"--output o\.jsonl: give the predictions CSV path"),
    case("infer-checkpoint-missing", "infer d.csv --checkpoint nock --output o.csv", {"d.csv": NLI + ROW}, 2, r"nock: checkpoint not found"),
    case("infer-checkpoint-empty-dir", "infer d.csv --checkpoint ck --output o.csv", {"d.csv": NLI + ROW, "ck": DIR}, 2, r"ck: not a checkpoint"),
    case("infer-checkpoint-is-file", "infer d.csv --checkpoint ck --output o.csv", {"d.csv": NLI + ROW, "ck": "x"}, 2, r"ck: not a (checkpoint|directory)"),
    case("infer-checkpoint-bad-run-config", "infer d.csv --checkpoint ck --output o.csv", {"d.csv": NLI + ROW, "ck/run_config.json": "{not json", "ck/config.json": "{}"}, 2, r"ck.*: cannot read the run config"),
    case("infer-checkpoint-empty-config", "infer d.csv --checkpoint ck --output o.csv", {"d.csv": NLI + ROW, **CKPT_FILES}, 2, r"ck"),
    case("infer-checkpoint-corrupt-weights", "infer d.csv --checkpoint ck --output o.csv", {"d.csv": NLI + ROW, "ck": Ckpt("nli", corrupt="model.safetensors")}, 2, r"ck.*model"),
    case("infer-checkpoint-no-tokenizer", "infer d.csv --checkpoint ck --output o.csv", {"d.csv": NLI + ROW, "ck": Ckpt("nli", drop=("tokenizer.json", "tokenizer_config.json"))}, 2, r"ck.*tokenizer"),
    case("infer-bad-override", "infer d.csv --checkpoint {nli} --output o.csv --infer_batch_size=0", {"d.csv": NLI + ROW}, 2, r"infer_batch_size=0"),
    case("infer-unknown-override", "infer d.csv --checkpoint {nli} --output o.csv --infer_batch_sise=8", {"d.csv": NLI + ROW}, 2, r"did you mean 'infer_batch_size'"),
    case("infer-bad-argument", "infer d.csv extra --checkpoint {nli}", {"d.csv": NLI + ROW}, 2, r"unexpected argument 'extra'"),
    case("infer-steps-checkpoint", "infer d.csv --checkpoint {ch} --output o.csv", {"d.csv": NLI + ROW}, 2, r"(task='confidence_head' has no generation step|d\.csv: cannot tell the format)"),
    # --- score ------------------------------------------------------------------------------------------------------
    case("score-length-mismatch", "score --pred p.txt --gold g.csv", {"p.txt": "1\n0\n", "g.csv": "label\n1\n0\n1\n"}, 2, r"p\.txt has 2 predictions but g\.csv has 3 gold labels"),
    case("score-missing-pred", "score --pred nope.csv --gold g.csv", {"g.csv": "label\n1\n"}, 2, r"nope\.csv: file not found"),
    case("score-missing-gold", "score --pred p.txt --gold nope.csv", {"p.txt": "1\n"}, 2, r"nope\.csv: file not found"),
    case("score-bad-pred-label", "score --pred p.txt --gold g.csv", {"p.txt": "1\n2\n", "g.csv": "label\n1\n0\n"}, 2, r"p\.txt:2: label must be 0 or 1"),
    case("score-bad-gold-label", "score --pred p.txt --gold g.csv", {"p.txt": "1\n0\n", "g.csv": "label\n1\nx\n"}, 2, r"g\.csv:3: label must be 0 or 1"),
    case("score-empty-pred", "score --pred p.txt --gold g.csv", {"p.txt": "", "g.csv": "label\n1\n"}, 2, r"p\.txt: file is empty"),
    case("score-pred-directory", "score --pred pd --gold g.csv", {"pd": DIR, "g.csv": "label\n1\n"}, 2, r"pd: is a directory, not a file"),
    case("score-gold-no-label", "score --pred p.txt --gold g.csv", {"p.txt": "1\n", "g.csv": "gold\n1\n"}, 2, r"g\.csv:1: gold file needs a label column"),
    case("score-gold-duplicate-header", "score --pred p.txt --gold g.csv", {"p.txt": "1\n", "g.csv": "label,label\n1,0\n"}, 2, r"g\.csv:1: column 'label' appears more than once"),
    case("score-gold-undecodable", "score --pred p.txt --gold g.csv", {"p.txt": "1\n", "g.csv": b"label\n\xff\n"}, 2, r"g\.csv:2: not valid UTF-8"),
    case("score-gold-nested", "score --pred p.txt --gold g.jsonl", {"p.txt": "1\n", "g.jsonl": DEEP}, 2, r"g\.jsonl:1: JSON nested too deeply"),
    case("score-blank-line", "score --pred p.txt --gold g.csv", {"p.txt": "1\n\n0\n", "g.csv": "label\n1\n0\n"}, 2, r"p\.txt:2: empty line in a label-per-line file"),
    case("score-confidence-range", "score --pred p.csv --gold g.csv", {"p.csv": "predicted_label,confidence\n1,1.5\n", "g.csv": "label\n1\n"}, 2, r"p\.csv:2: confidence must be a probability in \[0, 1\]"),
    case("score-id-mismatch", "score --pred p.csv --gold g.csv", {"p.csv": "id,predicted_label\na,1\n", "g.csv": "id,label\nb,1\n"}, 2, r"p\.csv:2: id 'a' does not match id 'b'"),
    case("score-n-bins", "score --pred p.csv --gold g.csv --n_bins=0", {"p.csv": "predicted_label,confidence\n1,0.5\n", "g.csv": "label\n1\n"}, 2, r"--n_bins=0: must be at least 1"),
    case("score-json-under-file", "score --pred p.txt --gold g.csv --json f/m.json", {"p.txt": "1\n", "g.csv": "label\n1\n", "f": "x"}, 2, r"f/m\.json: cannot write"),
    case("score-missing-gold-arg", "score --pred p.txt", {"p.txt": "1\n"}, 2, r"^error: .*--gold"),
    # --- tag --------------------------------------------------------------------------------------------------------
    case("tag-missing-input", "tag nope.jsonl --output o.jsonl --config {cfg_ct}", {}, 2, r"nope\.jsonl: file not found"),
    case("tag-empty-input", "tag q.jsonl --output o.jsonl --config {cfg_ct}", {"q.jsonl": "\n"}, 2, r"q\.jsonl: file is empty"),
    case("tag-broken-jsonl", "tag q.jsonl --output o.jsonl --config {cfg_ct}", {"q.jsonl": QA + '{"question": \n'}, 2, r"q\.jsonl:2: broken JSON line"),
    case("tag-bad-answer", "tag q.jsonl --output o.jsonl --config {cfg_ct}", {"q.jsonl": QA + QA.replace("true", '"perhaps"')}, 2, r"q\.jsonl:2: .*answer"),
    case("tag-unknown-dataset", "tag q.jsonl --output o.jsonl --config {cfg_ct}", {"q.jsonl": QA.replace("boolq", "trivia")}, 2, r"q\.jsonl:1: dataset 'trivia' has no tokens"),
    case("tag-dataset-flag", "tag q.jsonl --output o.jsonl --config {cfg_ct} --dataset trivia", {"q.jsonl": QA}, 2, r"--dataset='trivia' has no tokens"),
    case("tag-duplicate-header", "tag q.csv --output o.jsonl --config {cfg_ct}", {"q.csv": "question,answer,dataset,answer\nq,true,boolq,false\n"}, 2, r"q\.csv:1: column 'answer' appears more than once"),
    case("tag-nested", "tag q.jsonl --output o.jsonl --config {cfg_ct}", {"q.jsonl": QA + DEEP}, 2, r"q\.jsonl:2: JSON nested too deeply"),
    case("tag-directory-input", "tag q.jsonl --output o.jsonl --config {cfg_ct}", {"q.jsonl": DIR}, 2, r"q\.jsonl: is a directory, not a file"),
    case("tag-output-directory", "tag q.jsonl --output out --config {cfg_ct}", {"q.jsonl": QA, "out": DIR}, 2, r"--output out: is a directory"),
    case("tag-output-is-input", "tag q.jsonl --output q.jsonl --config {cfg_ct}", {"q.jsonl": QA}, 2, r"--output q\.jsonl: would overwrite the input"),
    case("tag-config-missing", "tag q.jsonl --output o.jsonl --config nope.py", {"q.jsonl": QA}, 2, r"nope\.py: config file not found"),
    case("tag-config-unknown-key", "tag q.jsonl --output o.jsonl --config c.py", {"q.jsonl": QA, "c.py": "lora_rr = 1\n"}, 2, r"c\.py:1: unknown config key 'lora_rr'"),
    case("tag-limit-zero", "tag q.jsonl --output o.jsonl --config {cfg_ct} --limit 0", {"q.jsonl": QA}, 2, r"--limit=0: must be at least 1"),
    case("tag-checkpoint-not-dir", "tag q.jsonl --output o.jsonl --config {cfg_ct} --checkpoint nock", {"q.jsonl": QA}, 2, r"--checkpoint nock: not a directory"),
    case("tag-bad-argument", "tag q.jsonl extra --output o.jsonl --config {cfg_ct}", {"q.jsonl": QA}, 2, r"unexpected argument(\(s\))? '?extra"),
    # --- score-steps ------------------------------------------------------------------------------------------------
    case("steps-missing-input", "score-steps nope.jsonl --checkpoint {ch} --output o.jsonl", {}, 2, r"nope\.jsonl: file not found"),
    case("steps-empty-input", "score-steps s.jsonl --checkpoint {ch} --output o.jsonl", {"s.jsonl": ""}, 2, r"s\.jsonl: file is empty"),
    case("steps-broken-jsonl", "score-steps s.jsonl --checkpoint {ch} --output o.jsonl", {"s.jsonl": STEP + '{"problem": "x", "steps": [\n'}, 2, r"s\.jsonl:2: broken JSON line"),
    case("steps-label-range", "score-steps s.jsonl --checkpoint {ch} --output o.jsonl", {"s.jsonl": STEP.replace("[1.0, 1.0]", "[1.0, 3]")}, 2, r"s\.jsonl:1: labels\[1\] = 3 is outside \[0, 1\]"),
    case("steps-labels-not-list", "score-steps s.jsonl --checkpoint {ch} --output o.jsonl", {"s.jsonl": STEP.replace("[1.0, 1.0]", '"good"')}, 2, r"s\.jsonl:1: labels must be a list"),
    case("steps-empty-steps", "score-steps s.jsonl --checkpoint {ch} --output o.jsonl", {"s.jsonl": STEP + STEP.replace('["Add them.", "It is 4."]', "[]")}, 2, r"s\.jsonl:2: steps must be a non-empty list"),
    case("steps-prm800k-format", "score-steps p.jsonl --checkpoint {ch} --output o.jsonl", {"p.jsonl": prm()}, 2, r"p\.jsonl: prm800k records; score-steps reads the generic"),
    case("steps-prm800k-rating-list", "score-steps p.jsonl --checkpoint {ch} --output o.jsonl", {"p.jsonl": prm(rating=[1])}, 2, r"p\.jsonl: prm800k records"),
    case("steps-nested", "score-steps s.jsonl --checkpoint {ch} --output o.jsonl", {"s.jsonl": STEP + DEEP}, 2, r"s\.jsonl:2: JSON nested too deeply"),
    case("steps-directory-input", "score-steps s.jsonl --checkpoint {ch} --output o.jsonl", {"s.jsonl": DIR}, 2, r"s\.jsonl: is a directory, not a file"),
    case("steps-output-is-input", "score-steps s.jsonl --checkpoint {ch} --output s.jsonl", {"s.jsonl": STEP}, 2, r"--output s\.jsonl is the input file"),
    case("steps-output-metrics-name", "score-steps s.jsonl --checkpoint {ch} --output o.metrics.json", {"s.jsonl": STEP}, 2, r"--output o\.metrics\.json: give the scores JSONL path"),
    case("steps-output-is-directory", "score-steps s.jsonl --checkpoint {ch} --output out", {"s.jsonl": STEP, "out": DIR}, 2, r"out: .*directory"),
    case("steps-checkpoint-empty-dir", "score-steps s.jsonl --checkpoint ck --output o.jsonl", {"s.jsonl": STEP, "ck": DIR}, 2, r"ck: not a checkpoint"),
    case("steps-checkpoint-of-nli", "score-steps s.jsonl --checkpoint {nli} --output o.jsonl", {"s.jsonl": STEP}, 2, r"trained for task='nli_cot'; (score-steps|this command) needs a confidence_head checkpoint"),
    case("steps-checkpoint-empty-config", "score-steps s.jsonl --checkpoint ck --output o.jsonl", {"s.jsonl": STEP, **CKPT_FILES}, 2, r"ck: trained for task='nli_cot'"),
    case("steps-checkpoint-corrupt-head", "score-steps s.jsonl --checkpoint ck --output o.jsonl", {"s.jsonl": STEP, "ck": Ckpt("ch", corrupt="head.safetensors")}, 2, r"ck.*head"),
    case("steps-checkpoint-no-head", "score-steps s.jsonl --checkpoint ck --output o.jsonl", {"s.jsonl": STEP, "ck": Ckpt("ch", drop=("head.safetensors",))}, 2, r"ck.*head"),
    case("steps-convert-rating-list", "steps convert p.jsonl out.jsonl", {"p.jsonl": prm(rating=[1])}, 2, r"p\.jsonl:1: label\.steps\[1\]: rating must be -1, 0, 1 or null, found \[1\]"),
    case("steps-convert-output-dir", "steps convert p.jsonl out", {"p.jsonl": prm(), "out": DIR}, 2, r"out: is a directory"),
    case("steps-convert-output-under-file", "steps convert p.jsonl f/out.jsonl", {"p.jsonl": prm(), "f": "x"}, 2, r"f/out\.jsonl: cannot create its folder, f is a file"),
    case("steps-convert-output-is-input", "steps convert p.jsonl p.jsonl", {"p.jsonl": prm()}, 2, r"p\.jsonl: the output is the input file"),
    case("steps-convert-pretty-broken", "steps convert p.json out.jsonl", {"p.json": json.dumps(json.loads(prm()), indent=2) + "\n{\n  \"question\": ,\n}\n"}, 2, r"p\.json:\d+: broken JSON"),
    # --- commands ---------------------------------------------------------------------------------------------------
    case("unknown-command", "trian c.py", {}, 2, r"(unknown command|No such command) 'trian'"),
]


# --- fixtures: one tiny checkpoint of each kind, for the whole module ------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_model_dir) -> dict[str, str]:
    from app.config import load_config
    from app.train import train

    root = tmp_path_factory.mktemp("bad_inputs_ckpt")
    common = [f"--model_name={tiny_model_dir}", "--create_tiny_model=False", "--max_steps=2", "--batch_size=4",
              "--micro_batch_size=4", "--warmup_steps=0", "--save_every=1000", "--log_every=1", "--tensorboard=False",
              "--dev_file=None"]
    nli = load_config(ROOT / "configs/tiny.py", [*common, f"--train_file={ROOT / 'data/sample/train.csv'}",
                                                 f"--out_dir={root / 'nli'}"])
    ch = load_config(ROOT / "configs/confidence_head_tiny.py", [*common, f"--out_dir={root / 'ch'}",
                                                                f"--train_file={ROOT / 'data/sample/steps/train.jsonl'}"])
    assert train(nli) == 0 and train(ch) == 0
    return {"nli": str(root / "nli" / "checkpoints" / "final"), "ch": str(root / "ch" / "checkpoints" / "final"),
            "model": str(tiny_model_dir)}


def expand(args: str, ckpts: dict[str, str]) -> list[str]:
    values = {"root": str(ROOT), "cfg_tiny": str(ROOT / "configs/tiny.py"),
              "cfg_ch": str(ROOT / "configs/confidence_head_tiny.py"),
              "cfg_ct": str(ROOT / "configs/confidence_tokens_tiny.py"), **ckpts}
    return shlex.split(args.format(**values))


def make_files(where: Path, files: dict, ckpts: dict[str, str]) -> list[Path]:
    import shutil

    unreadable = []
    for name, content in files.items():
        path = where / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is DIR:
            path.mkdir()
        elif isinstance(content, Ckpt):
            shutil.copytree(ckpts[content.kind], path)
            if content.corrupt:
                (path / content.corrupt).write_bytes(b"\x00garbage, not safetensors" * 4)
            for drop in content.drop:
                (path / drop).unlink()
        elif isinstance(content, Unreadable):
            path.write_bytes(content.content if isinstance(content.content, bytes) else content.content.encode())
            unreadable.append(path)
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return unreadable


def refuse_reads(monkeypatch, paths: list[Path]) -> None:
    """open() of these paths fails as it does for a file without read permission."""
    refused = {str(p.resolve()) for p in paths}
    real_open = io.open

    def guarded(file, *args, **kwargs):
        if isinstance(file, (str, Path)) and str(Path(file).resolve()) in refused:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", guarded)
    monkeypatch.setattr(builtins, "open", guarded)


def tree(where: Path) -> set[str]:
    return {str(p.relative_to(where)) for p in where.rglob("*")}


def run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    from app.__main__ import main

    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # what the process would exit with
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception:  # what a user would see: the traceback, exit 1
        import traceback

        traceback.print_exc()
        code = 1
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args, files, code, pattern, leaves, sub", CASES)
def test_bad_input(args, files, code, pattern, leaves, sub, checkpoints, tmp_path, monkeypatch, capsys):
    work = tmp_path / "case"
    work.mkdir()
    unreadable = make_files(work, files, checkpoints)
    before = tree(work)
    argv = expand(args, checkpoints)
    monkeypatch.chdir(work)
    if sub:
        assert not unreadable
        done = run_app(*argv, cwd=work, timeout=300)
        got, err = done.returncode, done.stderr
    else:
        if unreadable:
            refuse_reads(monkeypatch, unreadable)
        got, err = run_in_process(argv, capsys)
        monkeypatch.undo()
    assert_refused(got, err, code, pattern, work, before, leaves)


def assert_refused(got: int, err: str, code: int, pattern: str, work: Path, before: set[str], leaves) -> None:
    """Exit `code`, no traceback, the last stderr line an `error:` matching `pattern`, nothing new in `work`."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert got == code, err
    assert lines and lines[-1].startswith("error: "), err
    assert re.search(pattern, lines[-1]), (pattern, lines[-1])
    left = sorted(tree(work) - before - set(leaves))
    assert not left, f"left behind: {left}"


def test_the_table_covers_every_command():
    ids = [p.id for p in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 60
    commands = {p.values[0].split()[0] for p in CASES}
    assert {"train", "config", "infer", "score", "tag", "score-steps"} <= commands


# --- good inputs that used to be refused -----------------------------------------------------------------------------
def test_jsonl_with_line_separators_in_strings_trains(tmp_path, tiny_model_dir, capsys):
    from app.__main__ import main

    rows = [{"premise": f"A cat\u2028sleeps {i}.", "hypothesis": "An animal\u2029sleeps.", "label": i % 2}
            for i in range(8)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    from app.data import read_rows

    assert [r.values["premise"] for r in read_rows(path)] == [r["premise"] for r in rows]
    code = main(["train", str(ROOT / "configs/tiny.py"), f"--train_file={path}", f"--model_name={tiny_model_dir}",
                 "--create_tiny_model=False", f"--out_dir={tmp_path / 'run'}", "--dev_file=None", "--max_steps=1",
                 "--batch_size=4", "--micro_batch_size=4", "--warmup_steps=0", "--tensorboard=False"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoints" / "final" / "trainer_state.json").is_file()


def test_real_prm800k_fixture_converts(tmp_path):
    from app.tasks.confidence_head.step_data import convert, read_step_file

    src = SHARED / "prm800k" / "samples.jsonl"
    if not src.is_file():
        pytest.skip(f"{src} not present")
    assert convert(src, tmp_path / "steps.jsonl") == 3
    rows = read_step_file(tmp_path / "steps.jsonl")
    assert [len(r.values["steps"]) for r in rows] == [6, 7, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["steps.jsonl"]


def test_give_up_record_with_null_completions_ends_the_trajectory(tmp_path):
    from app.tasks.confidence_head.step_data import read_step_file

    rec = json.loads(prm())
    rec["label"]["finish_reason"] = "give_up"
    rec["label"]["steps"].insert(1, {"completions": None, "human_completion": None, "chosen_completion": None})
    path = tmp_path / "give_up.jsonl"
    path.write_text(json.dumps(rec) + "\n", encoding="utf-8")
    (row,) = read_step_file(path)
    assert row.values["steps"] == ["Let x be the price."] and row.values["labels"] == [1.0]


def test_predictions_csv_round_trips_a_bare_carriage_return():
    import csv

    try:
        from app.tasks.nli_cot.predict import predictions_csv
    except ImportError:  # before the predictor moved to the task
        from app.infer import predictions_csv

    record = {"label": 1, "thought": "first\rsecond", "parse_ok": True, "cut": False, "closed": True}
    rows = list(csv.DictReader(io.StringIO(predictions_csv([record], None), newline="")))
    assert [r["thought_process"] for r in rows] == ["first\rsecond"]
