"""Label extraction over realistic and malformed generations, and the JSON stop condition."""

from __future__ import annotations

import json
import random
import time

import pytest

from app.tasks.nli_cot.extract import Extraction, extract_label, json_object_closed, label_from_value

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
# json_object_closed

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


def test_json_object_closed_is_fast():
    thought = "The premise states that a man walks his dog, while the hypothesis says {something} else. " * 6
    open_text = '{"thought_process": "' + thought
    closed_text = open_text + '", "predicted_label": 1}'
    start = time.perf_counter()
    for _ in range(2000):
        json_object_closed(open_text)
        json_object_closed(closed_text)
    per_call = (time.perf_counter() - start) / 4000
    assert per_call < 500e-6, f"{per_call * 1e6:.1f} µs per call"
