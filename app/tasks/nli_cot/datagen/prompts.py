"""Versioned prompts of chain-of-thought data generation, and the parsers of their replies.

A prompt set is plain data (Markdown text with `$premise`-style placeholders, string.Template syntax), named by
its version; `prompt_version` in the config picks one, and a config may add or override sets in `prompts`
(version -> {key: text}, keys as in PROMPTS["v1"]). The version is part of every cache key and of each output
row's provenance, so a changed prompt is a new version, never a silent change of answered rows.

Premise, hypothesis and reasoning go inside XML tags, escaped so that text in them cannot close a tag.
"""

from __future__ import annotations

import json
import re
from string import Template
from xml.sax.saxutils import escape

V1_GENERATE_SYSTEM = """\
# Task
Decide whether the **premise** entails the **hypothesis** (natural language inference).

# Instructions
- The premise is inside `<premise>` tags, the hypothesis inside `<hypothesis>` tags.
- Reason in exactly three short steps: Step 1, what the premise states; Step 2, what the hypothesis claims;
  Step 3, whether the claim follows from the premise.
- Keep your reasoning brief: one short sentence per step.
- `predicted_label` is 1 if the premise entails the hypothesis, 0 if it does not.
- Reply with the JSON object only, no other text:
  {"thought_process": "Step 1: ... Step 2: ... Step 3: ...", "predicted_label": 0 or 1}
"""

V1_REFLECT_SYSTEM = """\
# Task
Write the reasoning for a natural language inference example: does the **premise** entail the **hypothesis**?

# Instructions
- The premise is inside `<premise>` tags, the hypothesis inside `<hypothesis>` tags.
- `<flawed_reasoning>` holds an earlier attempt that went wrong; find its mistake and do not repeat it.
- `<label>` is the correct answer (1 = entailed, 0 = not entailed). Your reasoning must reach it on its own merits.
- Never mention that a label, answer or earlier attempt was given, and do not say you are correcting anything:
  write the reasoning as if you worked it out yourself from the premise and the hypothesis alone.
- Reason in exactly three short steps (Step 1, Step 2, Step 3), one short sentence each. Keep your reasoning brief.
- Reply with the JSON object only, no other text:
  {"thought_process": "Step 1: ... Step 2: ... Step 3: ...", "predicted_label": 0 or 1}
"""

V1_CONSISTENCY_SYSTEM = """\
# Task
Read a premise, a hypothesis and a piece of reasoning about them. Which label does the reasoning reach?

# Instructions
- 1 = the premise entails the hypothesis, 0 = it does not.
- Judge only what the reasoning concludes.
- Reply with the JSON object only: {"predicted_label": 0 or 1}
"""

V1_JUDGE_SYSTEM = """\
# Task
Grade the reasoning of a natural language inference example.

# Instructions
- The premise is inside `<premise>` tags, the hypothesis inside `<hypothesis>` tags, the reasoning inside
  `<reasoning>` tags and its label (1 = entailed, 0 = not) inside `<label>` tags.
- Score each from 1 (poor) to 5 (excellent): **coherence** (the steps follow one another), **correctness** (the
  steps are true of the premise and hypothesis and reach the label), **brevity** (short, nothing superfluous).
- Reply with the JSON object only: {"coherence": 1-5, "correctness": 1-5, "brevity": 1-5}
"""

PROMPTS: dict[str, dict[str, str]] = {
    "v1": {
        "generate_system": V1_GENERATE_SYSTEM,
        "generate_user": "<premise>$premise</premise>\n<hypothesis>$hypothesis</hypothesis>",
        "example_premise": "In the museum, Carla is cooking.",
        "example_hypothesis": "Carla is cooking indoors.",
        "example_answer": json.dumps({
            "thought_process": "Step 1: Carla is cooking in a museum. Step 2: The hypothesis says she is cooking "
                               "indoors. Step 3: A museum is indoors, so the hypothesis follows.",
            "predicted_label": 1}),
        "reflect_system": V1_REFLECT_SYSTEM,
        "reflect_user": "<premise>$premise</premise>\n<hypothesis>$hypothesis</hypothesis>\n"
                        "<flawed_reasoning>$thought</flawed_reasoning>\n<label>$label</label>",
        "consistency_system": V1_CONSISTENCY_SYSTEM,
        "consistency_user": "<premise>$premise</premise>\n<hypothesis>$hypothesis</hypothesis>\n"
                            "<reasoning>$thought</reasoning>",
        "judge_system": V1_JUDGE_SYSTEM,
        "judge_user": "<premise>$premise</premise>\n<hypothesis>$hypothesis</hypothesis>\n"
                      "<reasoning>$thought</reasoning>\n<label>$label</label>",
        "repair": "Your reply could not be used: $problem. Reply again with only the JSON object $shape, "
                  "keeping the reasoning brief.",
    },
}

THOUGHT_SHAPE = '{"thought_process": "...", "predicted_label": 0 or 1}'
LABEL_SHAPE = '{"predicted_label": 0 or 1}'
JUDGE_SHAPE = '{"coherence": 1-5, "correctness": 1-5, "brevity": 1-5}'

THOUGHT_SCHEMA = {
    "name": "nli_thought",
    "strict": True,
    "schema": {"type": "object", "additionalProperties": False, "required": ["thought_process", "predicted_label"],
               "properties": {"thought_process": {"type": "string"},
                              "predicted_label": {"type": "integer", "enum": [0, 1]}}},
}
LABEL_SCHEMA = {
    "name": "nli_label",
    "strict": True,
    "schema": {"type": "object", "additionalProperties": False, "required": ["predicted_label"],
               "properties": {"predicted_label": {"type": "integer", "enum": [0, 1]}}},
}
JUDGE_SCHEMA = {
    "name": "nli_judge",
    "strict": True,
    "schema": {"type": "object", "additionalProperties": False, "required": ["coherence", "correctness", "brevity"],
               "properties": {k: {"type": "integer", "minimum": 1, "maximum": 5}
                              for k in ("coherence", "correctness", "brevity")}},
}


def prompt_set(cfg) -> dict[str, str]:
    """The prompts of cfg.prompt_version: the built-in set, or v1 overridden by the config's own `prompts`."""
    extra = getattr(cfg, "prompts", {}) or {}
    if cfg.prompt_version in extra:
        return {**PROMPTS.get(cfg.prompt_version, PROMPTS["v1"]), **extra[cfg.prompt_version]}
    return PROMPTS[cfg.prompt_version]


def _fill(template: str, **values) -> str:
    return Template(template).safe_substitute({k: escape(str(v)) for k, v in values.items()})


def label_text(label: int) -> str:
    return f"{label} ({'entailed' if label == 1 else 'not entailed'})"


def generate_prefix(p: dict) -> list[dict]:
    """The messages every first-pass request starts with: the instructions and the few-shot example."""
    return [
        {"role": "system", "content": p["generate_system"]},
        {"role": "user", "content": _fill(p["generate_user"], premise=p["example_premise"],
                                          hypothesis=p["example_hypothesis"])},
        {"role": "assistant", "content": p["example_answer"]},
    ]


def generate_messages(p: dict, premise: str, hypothesis: str, prefix: list[dict] | None = None) -> list[dict]:
    return [*(prefix if prefix is not None else generate_prefix(p)),
            {"role": "user", "content": _fill(p["generate_user"], premise=premise, hypothesis=hypothesis)}]


def reflect_messages(p: dict, premise: str, hypothesis: str, thought: str, label: int) -> list[dict]:
    return [
        {"role": "system", "content": p["reflect_system"]},
        {"role": "user", "content": _fill(p["reflect_user"], premise=premise, hypothesis=hypothesis,
                                          thought=thought or "(no usable answer)", label=label_text(label))},
    ]


def consistency_messages(p: dict, premise: str, hypothesis: str, thought: str) -> list[dict]:
    return [
        {"role": "system", "content": p["consistency_system"]},
        {"role": "user", "content": _fill(p["consistency_user"], premise=premise, hypothesis=hypothesis,
                                          thought=thought)},
    ]


def judge_messages(p: dict, premise: str, hypothesis: str, thought: str, label: int) -> list[dict]:
    return [
        {"role": "system", "content": p["judge_system"]},
        {"role": "user", "content": _fill(p["judge_user"], premise=premise, hypothesis=hypothesis, thought=thought,
                                          label=label_text(label))},
    ]


def repair_messages(p: dict, messages: list[dict], reply: str, problem: str, shape: str) -> list[dict]:
    """The conversation again, with the unusable reply and one request to answer with the JSON object only."""
    return [*messages, {"role": "assistant", "content": reply},
            {"role": "user", "content": Template(p["repair"]).safe_substitute(problem=problem, shape=shape)}]


# --- parsing replies -----------------------------------------------------------------------------------------------
class ParseError(ValueError):
    """A reply that is not the JSON object asked for; the message is the reason recorded for the row."""


_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.IGNORECASE)
_LEAK = re.compile(r"\b(gold|given|correct|provided|true)\s+(label|answer)\b|\blabel\s+(is|was)\s+(given|provided)\b"
                   r"|\bflawed reasoning\b|\bearlier attempt\b|\bprevious (attempt|reasoning)\b", re.IGNORECASE)


def json_object(text: str) -> dict:
    """The JSON object of a reply: the whole text, a fenced block, or the outermost {...} in it."""
    if not isinstance(text, str) or not text.strip():
        raise ParseError("empty reply")
    body = _FENCE.sub("", text.strip())
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        start, end = body.find("{"), body.rfind("}")
        if start < 0 or end <= start:
            raise ParseError("no JSON object in the reply") from None
        try:
            value = json.loads(body[start:end + 1])
        except (ValueError, RecursionError) as err:
            raise ParseError(f"broken JSON ({str(err).split(':')[0]})") from None
    if not isinstance(value, dict):
        raise ParseError(f"expected a JSON object, found {type(value).__name__}")
    return value


def _label(value, key: str = "predicted_label") -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return int(value.strip())
    raise ParseError(f"{key} must be 0 or 1, found {value!r}")


def parse_thought(text: str) -> dict:
    obj = json_object(text)
    if "predicted_label" not in obj:
        raise ParseError("no predicted_label in the JSON object")
    thought = obj.get("thought_process")
    if not isinstance(thought, str) or not thought.strip():
        raise ParseError("no thought_process text in the JSON object")
    return {"thought_process": " ".join(thought.split()), "predicted_label": _label(obj["predicted_label"])}


def parse_label(text: str) -> dict:
    obj = json_object(text)
    if "predicted_label" not in obj:
        raise ParseError("no predicted_label in the JSON object")
    return {"predicted_label": _label(obj["predicted_label"])}


def parse_judge(text: str) -> dict:
    obj = json_object(text)
    out = {}
    for key in ("coherence", "correctness", "brevity"):
        value = obj.get(key)
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= 5 or value != int(value):
            raise ParseError(f"{key} must be an integer from 1 to 5, found {value!r}")
        out[key] = int(value)
    return out


def mentions_given_label(thought: str) -> bool:
    """True when a reflected reasoning gives away that the label was handed to it."""
    return bool(_LEAK.search(thought or ""))
