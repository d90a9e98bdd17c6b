"""The nli_cot task: label extraction from generations, the JSON stop condition, the training target (loss on the
response and EOS only), the bundled sample set, the prompt budget of predictions and the forced-label fallback.

Where NLI runs exercise the engine (training and evaluation, `infer`'s order, resume and bad inputs, the shared
prompt prefix), the tests stay with the engine: test_train.py, test_infer.py, test_shared_prefix.py. The
chain-of-thought data generator (app/tasks/nli_cot/datagen/) is tested in test_cot_datagen.py.
"""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch

from app.__main__ import main
from app.data import Row
from app.tasks.nli_cot.backends import forced_labels, forced_prefix
from app.tasks.nli_cot.extract import Extraction, extract_label, json_object_closed, label_from_value
from app.tasks.nli_cot.predict import OutputPaths, _share, fit_prompts
from app.tasks.nli_cot.prompts import build_prompt, build_target
from app.tasks.nli_cot.sample import write_sample
from app.tasks.nli_cot.task import NliCot
from conftest import ROOT, tiny_config

# --------------------------------------------------------------------------------------------------------------------
# Label extraction: extract_label

# (generation, expected label, expected ok, expected how or None for "don't care")
CORPUS = [
    # clean output, the trained format
    ('{"thought_process": "The hypothesis restates the premise.", "predicted_label": 1}', 1, True, "json"),
    ('{"thought_process": "Nothing about dogs.", "predicted_label": 0}', 0, True, "json"),
    ('{"predicted_label": 1, "thought_process": "key order swapped"}', 1, True, "json"),
    # code fences, prose before and after
    ('```json\n{"thought_process": "ok", "predicted_label": 0}\n```', 0, True, "json"),
    ('```\n{"thought_process": "ok", "predicted_label": 1}\n```\nDone.', 1, True, "json"),
    ('Sure! Here is my analysis:\n{"thought_process": "x", "predicted_label": 1}\nHope this helps.', 1, True, "json"),
    # end-of-sequence strings and padding after (or in) the object
    ('{"thought_process": "x", "predicted_label": 0}</s>', 0, True, "json"),
    ('{"thought_process": "x", "predicted_label": 1}<|endoftext|><pad><pad>', 1, True, "json"),
    ('{"thought_process": "x", "predicted_label": 1<|im_end|>', 1, True, "json_repaired"),
    # label value variants
    ('{"thought_process": "x", "predicted_label": "1"}', 1, True, "json"),
    ('{"thought_process": "x", "predicted_label": "0"}', 0, True, "json"),
    ('{"thought_process": "x", "predicted_label": true}', 1, True, "json"),
    ('{"thought_process": "x", "predicted_label": false}', 0, True, "json"),
    ('{"thought_process": "x", "predicted_label": "entailment"}', 1, True, "json"),
    ('{"thought_process": "x", "predicted_label": "not_entailment"}', 0, True, "json"),
    ('{"thought_process": "x", "predicted_label": "Not Entailment"}', 0, True, "json"),
    ('{"thought_process": "x", "predicted_label": "contradiction"}', 0, True, "json"),
    ('{"thought_process": "x", "predicted_label": "neutral"}', 0, True, "json"),
    ('{"thought_process": "x", "predicted_label": "yes"}', 1, True, "json"),
    ('{"thought_process": "x", "predicted_label": "No"}', 0, True, "json"),
    ('{"thought_process": "x", "predicted_label": 1.0}', 1, True, "json"),
    ('{"thought_process": "x", "predicted_label": "1 (entailment)"}', 1, True, "json"),
    ('{"thought_process": "x", "predicted_label": ["0"]}', 0, True, "json"),
    # Python-dict style
    ("{'thought_process': 'It does not follow.', 'predicted_label': 0}", 0, True, "json_repaired"),
    ("{'thought_process': 'It doesn't follow, clearly.', 'predicted_label': 1}", 1, True, "json_repaired"),
    ("{'thought_process': \"it's entailed\", 'predicted_label': True}", 1, True, "json_repaired"),
    ("{'thought_process': 'x', 'predicted_label': None} {'label': 'no'}", 0, True, "json_repaired"),
    # truncated generations (missing closing brace)
    ('{"thought_process": "The premise says so.", "predicted_label": 1', 1, True, "json_repaired"),
    ('{"thought_process": "The premise says so.", "predicted_label": "0', 0, True, "json_repaired"),
    ('{"thought_process": "The premise says so.", "predicted_label": 0,', 0, True, "json_repaired"),
    ('{"thought_process": "The premise says so.", "predicted_label": ', None, False, "none"),
    ('{"thought_process": "The premise says so and', None, False, "none"),
    ('{"thought_process": "x", "output": {"predicted_label": 1', 1, True, "json_repaired"),
    # trailing commas, missing commas, other repairs
    ('{"thought_process": "x", "predicted_label": 1,}', 1, True, "json_repaired"),
    ('{"thought_process": "x",, "predicted_label": 0,\n}', 0, True, "json_repaired"),
    ('{"thought_process": "x" "predicted_label": 1}', 1, True, "json_repaired"),
    ("{thought_process: x, predicted_label 0}", 0, True, "json_repaired"),  # missing colon
    ("{thought_process: premise implies it, predicted_label: entailment}", 1, True, "json_repaired"),
    ('{"thought_process": "x", "predicted_label": not entailment}', 0, True, "json_repaired"),
    # quotes and braces inside the thought
    ('{"thought_process": "He said \\"hi\\" to her.", "predicted_label": 1}', 1, True, "json"),
    ('{"thought_process": "He said "hi" to her, so yes.", "predicted_label": 1}', 1, True, "json_repaired"),
    ('{"thought_process": "The set {a, b} has {nested {braces}}.", "predicted_label": 0}', 0, True, "json"),
    ('{"thought_process": "an unbalanced { brace", "predicted_label": 1}', 1, True, "json"),
    ('{"thought_process": "line one\nline two", "predicted_label": 0}', 0, True, "json"),  # raw newline in string
    # several objects: the first that holds a label wins
    ('{"thought_process": "draft"}\n{"thought_process": "final", "predicted_label": 0}', 0, True, "json"),
    ('{"predicted_label": 1} {"predicted_label": 0}', 1, True, "json"),
    ('{"thought_process": "x", "predicted_label": 7} {"predicted_label": "0"}', 0, True, "json"),
    ('Template {the answer} then {"thought_process": "x", "predicted_label": 1}', 1, True, "json"),
    ('{"result": {"thought_process": "nested", "predicted_label": 1}}', 1, True, "json"),
    ('[{"thought_process": "in a list", "predicted_label": 0}]', 0, True, "json"),
    # key variants: case, spaces, other names
    ('{"Thought Process": "x", "Predicted Label": 1}', 1, True, "json"),
    ('{"THOUGHT_PROCESS": "x", "PREDICTED_LABEL": 0}', 0, True, "json"),
    ('{"predicted-label": 1}', 1, True, "json"),
    ('{"reasoning": "x", "label": 0}', 0, True, "json"),
    ('{"thought_process": "x", "answer": "entailment"}', 1, True, "json"),
    ('{"thought_process": "x", "prediction": "contradiction"}', 0, True, "json"),
    # no object at all: regex over the text (label but ok False), or nothing
    ("The predicted_label: 1 because the premise entails it.", 1, False, "regex"),
    ('"predicted_label": "not_entailment"', 0, False, "regex"),
    ("I think the answer is yes but let me explain more", None, False, "none"),
    ("", None, False, "none"),
    ("</s>", None, False, "none"),
    ("{}", None, False, "none"),
    ('{"thought_process": "x", "predicted_label": "maybe"}', None, False, "none"),
    ("{{{{", None, False, "none"),
    ("}}}} {", None, False, "none"),
]


@pytest.mark.parametrize(("text", "label", "ok", "how"), CORPUS, ids=[f"case{i:02d}" for i in range(len(CORPUS))])
def test_corpus(text, label, ok, how):
    got = extract_label(text)
    assert isinstance(got, Extraction)
    assert (got.label, got.ok) == (label, ok), got
    if how is not None:
        assert got.how == how, got
    assert isinstance(got.thought, str)


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 30


@pytest.mark.parametrize(
    ("text", "thought"),
    [
        ('{"thought_process": "  The premise says so. ", "predicted_label": 1}', "The premise says so."),
        ('{"thought_process": "He said \\"hi\\"", "predicted_label": 1}', 'He said "hi"'),
        ('{"thought_process": "He said "hi" to her", "predicted_label": 1}', 'He said "hi" to her'),
        ("{'thought_process': 'It doesn\\'t follow', 'predicted_label': 0}", "It doesn't follow"),
        ('{"thought_process": "a {b} c", "predicted_label": 0}', "a {b} c"),
        ('{"Thought Process": "spaced key", "Predicted Label": 0}', "spaced key"),
        ('{"predicted_label": 1}', ""),
        ('{"thought_process": "cut off mid', "cut off mid"),  # no label: the thought is still kept
        ("no json at all", "no json at all"),  # nothing parsed: the cleaned generation
        ("no json at all</s>", "no json at all"),
    ],
)
def test_thought(text, thought):
    assert extract_label(text).thought == thought


def test_extraction_is_frozen():
    got = extract_label('{"predicted_label": 1}')
    with pytest.raises(AttributeError):
        got.label = 0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("value", "label"),
    [(1, 1), (0, 0), (2, None), (True, 1), (False, 0), (1.0, 1), (0.5, None), ("1", 1), (" 0 ", 0),
     ("TRUE", 1), ("entailment.", 1), ("non-entailment", 0), ("LABEL_1", 1), ("", None), (None, None), ({}, None)],
)
def test_label_from_value(value, label):
    assert label_from_value(value) == label


def _random_text(rng: random.Random, n: int) -> str:
    alphabet = list("abc xyz{}[]\"'\\:,.\n\t") + ["é", "日", "—"]
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_roundtrip_random_objects():
    """Any well-formed object, JSON or Python-dict style, around any text, extracts exactly."""
    rng = random.Random(1234)
    for _ in range(400):
        thought = _random_text(rng, rng.randint(0, 40))
        label = rng.choice([0, 1])
        obj = {"thought_process": thought, "predicted_label": label}
        if rng.random() < 0.3:
            obj = {"predicted_label": label, "thought_process": thought}
        body = rng.choice([json.dumps(obj, ensure_ascii=rng.random() < 0.5), repr(obj)])
        text = rng.choice(["", "Here:\n", "```json\n", "Draft {x} "]) + body + rng.choice(["", "</s>", "\n```", " {y}"])
        got = extract_label(text)
        assert (got.label, got.ok, got.thought) == (label, True, thought.strip()), text


# --------------------------------------------------------------------------------------------------------------------
# The JSON stop condition: json_object_closed

CLOSED = [
    ('{"thought_process": "x", "predicted_label": 1}', True),
    ('{"thought_process": "x", "predicted_label": 1', False),
    ('{"thought_process": "x", "predicted_label": 1}</s>', True),
    ('```json\n{"thought_process": "x", "predicted_label": 1}', True),
    ('Sure: {"a": 1} more text', True),
    ('{"thought_process": "a } brace in a string', False),
    ('{"thought_process": "a } brace", "predicted_label": 1', False),
    ('{"thought_process": "a {b} c", "predicted_label": 0}', True),
    ('{"thought_process": "escaped \\" quote }", "predicted_label": 0', False),
    ('{"thought_process": "escaped \\" quote }", "predicted_label": 0}', True),
    ('{"thought_process": "x", "nested": {"a": 1}', False),
    ('{"thought_process": "x", "nested": {"a": 1}}', True),
    ("{'thought_process': 'it doesn't } close', 'predicted_label': 1", False),
    ("{'thought_process': 'it doesn't } close', 'predicted_label': 1}", True),
    ('{"thought_process": "it\'s fine", "predicted_label": 1}', True),
    ('{"thought_process": "trailing backslash \\', False),
    ("", False),
    ("}", False),
    ("{", False),
    ("no braces at all", False),
    ("{the answer} is", False),  # prose braces are not an object
    ("{}", True),
    ("{ }", True),
    ('{\n  "predicted_label": 1\n}', True),
]


@pytest.mark.parametrize(("text", "closed"), CLOSED, ids=[f"closed{i:02d}" for i in range(len(CLOSED))])
def test_json_object_closed(text, closed):
    assert json_object_closed(text) is closed


def test_json_object_closed_on_every_prefix():
    """As a stop condition: false on every proper prefix of a generation, true once the object closes."""
    rng = random.Random(99)
    for _ in range(150):
        obj = {"thought_process": _random_text(rng, rng.randint(0, 30)), "predicted_label": rng.choice([0, 1])}
        body = json.dumps(obj, ensure_ascii=rng.random() < 0.5)
        text = rng.choice(["", "```json\n", "Answer: "]) + body
        closes_at = len(text)
        for k in range(closes_at):
            assert not json_object_closed(text[:k]), text[:k]
        assert json_object_closed(text)
        assert json_object_closed(text + "\n```</s>")


def test_json_object_closed_on_a_long_thought():
    """A long open thought with braces inside its string is open until the object closes (no timing here: the check
    runs at every generated token, and its speed is a benchmark matter, not a test's)."""
    thought = "The premise states that a man walks his dog, while the hypothesis says {something} else. " * 6
    open_text = '{"thought_process": "' + thought
    closed_text = open_text + '", "predicted_label": 1}'
    assert not json_object_closed(open_text)
    assert json_object_closed(closed_text)
    assert not json_object_closed(closed_text[:-1])

# --------------------------------------------------------------------------------------------------------------------
# The training target

ROW = {"premise": "Zoë's café — naïve résumé 😀 stays open.", "hypothesis": "The café is closed.", "label": 0,
       "thought_process": 'The premise says "open"; the hypothesis says closed.'}


def test_loss_only_on_response_and_eos(tokenizer_and_cfg):
    tok, cfg = tokenizer_and_cfg
    f = NliCot().encode(Row(2, dict(ROW)), tok, cfg)
    prompt_ids = tok(build_prompt(ROW, cfg)).input_ids
    n = len(prompt_ids)
    assert f.input_ids[:n] == prompt_ids and f.labels[:n] == [-100] * n
    target = f.labels[n:]
    assert -100 not in target and target == f.input_ids[n:]
    assert target[-1] == tok.eos_token_id
    text = tok.decode(target[:-1])
    assert json.loads(text) == {"thought_process": ROW["thought_process"], "predicted_label": 0}
    assert extract_label(tok.decode(target, skip_special_tokens=True)).label == 0
    assert NliCot().loss_items(f) == len(target)


def test_label_only_target_without_thought(tokenizer_and_cfg):
    tok, cfg = tokenizer_and_cfg
    row = {**ROW, "thought_process": "", "label": 1}
    f = NliCot().encode(Row(2, row), tok, cfg)
    target = [t for t in f.labels if t != -100]
    assert json.loads(tok.decode(target[:-1])) == {"predicted_label": 1} and target[-1] == tok.eos_token_id
    assert build_target(1, None) == '{"predicted_label": 1}'


# --------------------------------------------------------------------------------------------------------------------
# The bundled sample set


def test_sample_data_is_the_generator_output(tmp_path):
    write_sample(tmp_path)
    for split in ("train", "dev", "test"):
        assert (tmp_path / f"{split}.csv").read_bytes() == (ROOT / "data/sample" / f"{split}.csv").read_bytes()


# --------------------------------------------------------------------------------------------------------------------
# Predictions: the prompt budget and the forced-label fallback


def test_fit_prompts_respects_budget(tiny_model_dir):
    from transformers import AutoTokenizer

    from app.config import make_config

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    cfg = make_config(max_seq_length=120, max_new_tokens=20)
    values = [{"premise": "alpha beta " * 500, "hypothesis": "gamma " * 300},
              {"premise": "short", "hypothesis": "delta epsilon " * 400},
              {"premise": "short", "hypothesis": "also short"}]
    cut = fit_prompts(values, tok, cfg)
    assert cut == [True, True, False]
    for v in values:
        assert len(tok(build_prompt(v, cfg)).input_ids) <= 100
    assert values[1]["premise"] == "short" and values[2]["hypothesis"] == "also short"
    assert values[0]["premise"].startswith("alpha beta") and values[0]["hypothesis"].startswith("gamma")
    assert _share(10, 100, 50) == (10, 40) and _share(100, 100, 50) == (25, 25) and _share(5, 5, 50) == (5, 5)


def test_long_field_empty_premise_and_jsonl(tmp_path, tiny_final_checkpoint, capsys):
    path = tmp_path / "odd.jsonl"
    rows = [
        {"premise": "", "hypothesis": "Someone is outdoors."},
        {"premise": "word " * 200_000 + "end", "hypothesis": "A very long premise."},  # 1 MB
        {"premise": "Ana is reading in the library.", "hypothesis": "Ana is indoors.", "other": [1, 2]},
        {"premise": 7, "hypothesis": None},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "odd.csv"
    assert main(["infer", str(path), "--checkpoint", str(tiny_final_checkpoint), "--output", str(out),
                 "--max_new_tokens=4", "--max_seq_length=96"]) == 0
    captured = capsys.readouterr()
    assert "1 row(s) cut to the prompt budget of 92 tokens" in captured.err
    with open(out, newline="", encoding="utf-8") as f:
        got = list(csv.DictReader(f))
    assert [r["index"] for r in got] == ["0", "1", "2", "3"] and "id" not in got[0]
    assert all(r["predicted_label"] in ("0", "1") for r in got)
    summary = json.loads(OutputPaths.for_output(out).metrics.read_text())
    assert summary["prompts_truncated"] == 1 and "metrics" not in summary


def test_forced_labels_pick_the_label_token_the_model_ranks_higher(model_and_tokenizer, tmp_path):
    import copy

    model, tok = model_and_tokenizer
    cfg = tiny_config(model.name_or_path, tmp_path)
    prompts = [build_prompt({"premise": f"In the {place}, Ben is {verb}.", "hypothesis": "Ben is indoors."}, cfg)
               for place in ("museum", "beach", "garage", "park") for verb in ("cooking", "reading", "waiting")]
    thoughts = ["The place is indoors.", "", "x", "The beach is outdoors. They differ."] * 3
    def context(i: int) -> str:
        head_text = '{"thought_process": "' + thoughts[i] + '", ' if thoughts[i] else "{"
        return prompts[i] + head_text + '"predicted_label": '

    t0, t1 = tok(context(1) + "0").input_ids[-1], tok(context(1) + "1").input_ids[-1]
    # a random model ranks the two the same way whatever the context; make "1" win after row 0's context and
    # lose after row 1's: its head row is "0"'s plus the difference of those two rows' final hidden states
    model = copy.deepcopy(model)
    with torch.no_grad():
        h = [model.model(input_ids=torch.tensor([tok(context(i) + "0").input_ids[:-1]])).last_hidden_state[0, -1]
             for i in (0, 1)]
        head = model.get_output_embeddings().weight
        head[t1] = head[t0] + 50 * (h[0] - h[1])
    want = []
    for prompt, thought in zip(prompts, thoughts):
        head_text = '{"thought_process": "' + thought + '", ' if thought else "{"
        scores = []
        for label in "01":  # one full forward per candidate, as a reader would check it
            full = tok(prompt + head_text + '"predicted_label": ' + label).input_ids
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([full[:-1]])).logits[0, -1].log_softmax(-1)
            scores.append(logp[full[-1]].item())
        want.append(int(scores[1] > scores[0]))
    assert 0 < sum(want) < len(want)  # both labels occur: the comparison is not decided by the head alone
    prefixes = [forced_prefix(prompt, thought) for prompt, thought in zip(prompts, thoughts)]
    assert forced_labels(model, tok, prefixes, "cpu", prefill_tokens=64) == want
