"""Label extraction from generations of a model trained to emit
``{"thought_process": "...", "predicted_label": 0|1}``.

Real generations are not always clean JSON: they come wrapped in code fences, with prose before or after, in
Python-dict style with single quotes, with trailing commas or unescaped quotes, cut off before the closing brace, or
followed by end-of-sequence strings. :func:`extract_label` tries, in order:

1. ``json``: the first ``{`` whose object parses as JSON as is and holds a usable label (searching nested objects too);
2. ``json_repaired``: the same objects run through a tolerant tokenizer that accepts single quotes, bare words,
   Python literals, trailing or missing commas, unescaped quotes inside strings, and a missing end (truncation);
3. ``regex``: a ``predicted_label: <value>`` pair anywhere in the text (``ok`` stays False: the structure did not
   parse, so the caller should mark the row);
4. ``none``: no label; the caller falls back to scoring the label tokens itself.

:func:`json_object_closed` is the generation stop condition: whether the text so far holds a complete top-level
object. It uses the same string rules as the extractor, so "closed" and "parseable" agree.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

__all__ = ["Extraction", "extract_label", "json_object_closed", "label_from_value"]


@dataclass(frozen=True)
class Extraction:
    label: int | None  # 0/1, or None when no label was found
    thought: str  # the thought_process text ("" when the object had none; the cleaned text when nothing parsed)
    ok: bool  # True only when the label came from a JSON-ish object
    how: str  # "json", "json_repaired", "regex" or "none"


# Keys are compared after lowercasing and dropping everything but letters and digits ("Predicted Label" ->
# "predictedlabel"). Earlier entries win when an object holds several.
LABEL_KEYS = ("predictedlabel", "label", "answer", "prediction", "predictedclass", "finallabel", "finalanswer", "pred")
THOUGHT_KEYS = (
    "thoughtprocess", "thought", "thoughts", "reasoning", "rationale", "explanation", "chainofthought", "cot",
)

_TRUE_WORDS = {"1", "true", "yes", "y", "entailment", "entailed", "entails", "entail"}
_FALSE_WORDS = {
    "0", "false", "no", "n", "notentailment", "nonentailment", "notentailed", "nonentailed", "notentail",
    "contradiction", "contradicts", "contradictory", "neutral",
}

# End-of-sequence and padding strings a decoder may leave in the text.
_SPECIAL = re.compile(r"</s>|<s>|<eos>|<pad>|<unk>|<\|[A-Za-z_]+\|>|\[/?INST\]")

# Bounds for pathological input only (generations are a few hundred tokens): objects tried per text, and characters
# the tolerant reader may walk in all.
_MAX_CANDIDATES = 64
_REPAIR_BUDGET = 200_000


def _norm_key(key: object) -> str:
    return re.sub(r"[^a-z0-9]", "", str(key).lower())


def label_from_value(value: object) -> int | None:
    """Map a label value as a model writes it (1, "1", true, "entailment", "no", ...) to 0/1, or None."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value if value in (0, 1) else None
    if isinstance(value, float):
        return int(value) if value in (0.0, 1.0) else None
    if isinstance(value, list) and len(value) == 1:
        return label_from_value(value[0])
    if not isinstance(value, str):
        return None
    word = value.strip().lower()
    key = re.sub(r"[^a-z0-9.]", "", word).strip(".")
    if key in _TRUE_WORDS:
        return 1
    if key in _FALSE_WORDS:
        return 0
    if key in ("1.0", "0.0"):
        return int(float(key))
    m = re.fullmatch(r"(?:label[ _]?)?([01])(?:\s*[-:(].*)?", word, flags=re.S)  # "LABEL_1", "1 (entailment)"
    if m:
        return int(m.group(1))
    m = re.fullmatch(r"(not[ _-]?entailment|non[ _-]?entailment|entailment|contradiction|neutral)\b.*", word, re.S)
    if m:  # "entailment (the hypothesis follows)"
        return label_from_value(m.group(1))
    return None


# --------------------------------------------------------------------------------------------------------------------
# Strings. A quote closes a string only when what follows could follow a JSON string (`,` `:` `}` `]`, the end, or a
# `"key":` after a forgotten comma); otherwise it is a literal quote the model forgot to escape. For valid JSON this is
# exactly the JSON rule. A single quote opens a string only in a structural position (after `{ [ , :`), so apostrophes
# in prose and in double-quoted text are never delimiters, and "doesn't" inside a single-quoted string is not an end.

_CLOSES_STRING = re.compile(
    r"\s*(?:$|[:}\]]|,\s*(?:$|[\"'{\[}\],\-\d]|(?:true|false|null)\b)|[\"'][^\"'\n]*[\"']\s*:)"
)
_STRUCT = re.compile(r"[{}\"']")
_STRING_STOP = {'"': re.compile(r'["\\]'), "'": re.compile(r"['\\]")}
_OBJECT_START = re.compile(r"\{\s*(?:[\"'}]|$|[A-Za-z_][\w \-]*[\"']?\s*:)")


def _string_end(text: str, pos: int, quote: str) -> int | None:
    """Index of the quote that closes the string whose content starts at `pos`, or None if it never closes."""
    stop = _STRING_STOP[quote]
    while True:
        m = stop.search(text, pos)
        if m is None:
            return None
        j = m.start()
        if text[j] == "\\":
            pos = j + 2
            continue
        if _CLOSES_STRING.match(text, j + 1):
            return j
        pos = j + 1


def _prev_significant(text: str, pos: int) -> str:
    k = pos - 1
    while k >= 0 and text[k].isspace():
        k -= 1
    return text[k] if k >= 0 else ""


def json_object_closed(text: str) -> bool:
    """Whether `text` (a generation so far) contains a complete top-level JSON object.

    Braces inside strings do not count; a ``{`` in prose that does not start an object (``{the}``) is ignored. Cheap
    enough to call after every generated token.
    """
    if "}" not in text or "{" not in text:
        return False
    depth = 0
    pos = 0
    search = _STRUCT.search
    while True:
        m = search(text, pos)
        if m is None:
            return False
        j = m.start()
        c = text[j]
        pos = j + 1
        if c == "{":
            if depth or _OBJECT_START.match(text, j):
                depth += 1
        elif c == "}":
            if depth:
                depth -= 1
                if not depth:
                    return True
        elif depth and (c == '"' or _prev_significant(text, j) in "{[,:"):
            end = _string_end(text, pos, c)
            if end is None:
                return False
            pos = end + 1


# --------------------------------------------------------------------------------------------------------------------
# Tolerant object reader: walks from a `{` and emits strict JSON tokens.

_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_WORD = re.compile(r"[A-Za-z_][\w\-]*(?:[ \t]+[A-Za-z_][\w\-]*)*")
_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|.)", re.S)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "/": "/"}
_LITERALS = {"true": "true", "false": "false", "null": "null", "none": "null"}

_VALUE_END = ("str", "num", "lit", "close")


def _unescape(raw: str) -> str:
    def sub(m: re.Match) -> str:
        s = m.group(1)
        if s[0] == "u" and len(s) == 5:
            return chr(int(s[1:], 16))
        return _ESCAPES.get(s, s)  # \" \' \\ and unknown escapes keep the character

    return _ESCAPE.sub(sub, raw)


def _trim_tail(tokens: list[list[str]]) -> None:
    """Drop a dangling `,`, `"key":` or `"key"` at the end (before a closer or at a truncation)."""
    while tokens:
        kind = tokens[-1][0]
        if kind == "comma" or kind == "key":
            tokens.pop()
        elif kind == "colon":
            tokens.pop()
            if tokens and tokens[-1][0] in ("key", "str"):
                tokens.pop()
        else:
            return


def _repair_object(text: str, start: int) -> tuple[str, int]:
    """Strict JSON for the object starting at text[start] == "{", and the index just after it (len(text) when the
    object never closes: it is then completed)."""
    tokens: list[list[str]] = []  # [kind, json text]
    stack: list[str] = []
    n = len(text)
    i = start

    def add_value(kind: str, value: str) -> None:
        prev = tokens[-1][0] if tokens else ""
        in_object = bool(stack) and stack[-1] == "{"
        if prev == "key":
            tokens.append(["colon", ":"])  # `"label" 1`: a missing colon
        elif prev in _VALUE_END:
            tokens.append(["comma", ","])  # `"a" "b"`: a missing comma
            prev = "comma"
        if kind in ("str", "num", "lit") and in_object and prev in ("open", "comma"):
            if kind != "str":
                value = json.dumps(value)  # `{1: ...}`, `{true: ...}`: keys must be strings
            kind = "key"
        tokens.append([kind, value])

    while i < n:
        c = text[i]
        if c == "{" or c == "[":
            add_value("open", c)
            stack.append(c)
            i += 1
        elif c == "}" or c == "]":
            _trim_tail(tokens)
            opener = stack.pop()
            tokens.append(["close", "}" if opener == "{" else "]"])
            i += 1
            if not stack:
                return "".join(t[1] for t in tokens), i
        elif c == ",":
            if tokens and tokens[-1][0] not in ("open", "comma", "colon"):
                tokens.append(["comma", ","])
            i += 1
        elif c == ":" or (c == "=" and tokens and tokens[-1][0] == "key"):
            if tokens and tokens[-1][0] in ("key", "str"):
                tokens[-1][0] = "key"
                tokens.append(["colon", ":"])
            i += 1
        elif c == '"' or (c == "'" and tokens and tokens[-1][0] in ("open", "comma", "colon")):
            end = _string_end(text, i + 1, c)
            raw = text[i + 1 :] if end is None else text[i + 1 : end]
            add_value("str", json.dumps(_unescape(raw)))
            i = n if end is None else end + 1
        elif c.isdigit() or c in "-+.":
            m = _NUMBER.match(text, i)
            if m is None:
                i += 1
                continue
            s = m.group()
            number = float(s)
            if number.is_integer() and not re.search(r"[.eE]", s):
                add_value("num", str(int(number)))
            elif number == number and abs(number) != float("inf"):
                add_value("num", repr(number))
            i = m.end()
        elif c.isalpha() or c == "_":
            m = _WORD.match(text, i)
            word = m.group()
            lit = _LITERALS.get(word.lower())
            if lit is not None:
                add_value("lit", lit)
            else:
                add_value("str", json.dumps(word))
            i = m.end()
        else:
            i += 1  # whitespace, code-fence backticks, stray characters
    # Ran off the end: a truncated generation. Drop the unfinished member and close what is open.
    _trim_tail(tokens)
    closers = "".join("}" if o == "{" else "]" for o in reversed(stack))
    return "".join(t[1] for t in tokens) + closers, n


# --------------------------------------------------------------------------------------------------------------------

_DECODER = json.JSONDecoder(strict=False)


def _labelled(obj: object) -> tuple[int, str] | None:
    """(label, thought) from the first dict (depth first, outer before inner) holding a usable label."""
    if isinstance(obj, dict):
        label = _label_here(obj)
        if label is not None:
            return label, (_find_here(obj, THOUGHT_KEYS) or "")
        children = obj.values()
    elif isinstance(obj, list):
        children = obj
    else:
        return None
    for child in children:
        found = _labelled(child)
        if found is not None:
            return found
    return None


def _find_here(obj: dict, keys: tuple[str, ...]) -> str | None:
    normed: dict = {}
    for k, v in obj.items():
        normed.setdefault(_norm_key(k), v)
    for key in keys:
        if key in normed:
            value = normed[key]
            if isinstance(value, str):
                return value.strip()
            return "" if value is None else json.dumps(value, ensure_ascii=False)
    return None


def _label_here(obj: dict) -> int | None:
    normed: dict = {}
    for k, v in obj.items():
        normed.setdefault(_norm_key(k), v)
    for key in LABEL_KEYS:
        if key in normed:
            label = label_from_value(normed[key])
            if label is not None:
                return label
    return None


_LABEL_PAIR = re.compile(
    r"""["']?\s*(?:predicted[\s_-]*label|label|answer|prediction)\s*["']?\s*[:=]\s*["']?\s*"""
    r"""(not[\s_-]?entailment|non[\s_-]?entailment|[A-Za-z]+|[01](?:\.0)?)\b""",
    re.I,
)
_THOUGHT_PAIR = re.compile(
    r"""["']?\s*thought[\s_-]*process\s*["']?\s*:\s*(["'])(.*?)(?:(?<!\\)\1\s*[,}]|$)""",
    re.I | re.S,
)


def clean_generation(text: str) -> str:
    """The generation without end-of-sequence/padding strings and surrounding whitespace."""
    return _SPECIAL.sub("", text).strip()


def extract_label(text: str) -> Extraction:
    """Find the 0/1 label (and the thought) in one generation; see the module docstring for the order tried."""
    text = clean_generation(text or "")
    thought_seen: str | None = None
    pos = 0
    budget = _REPAIR_BUDGET
    for _ in range(_MAX_CANDIDATES):
        start = text.find("{", pos)
        if start < 0:
            break
        pos = start + 1
        obj, how = None, "json"
        try:
            obj, end = _DECODER.raw_decode(text, start)
        except (ValueError, RecursionError):
            how = "json_repaired"
            if budget <= 0:
                continue
            budget -= len(text) - start
            try:
                repaired, end = _repair_object(text, start)
                obj = json.loads(repaired)
            except (ValueError, RecursionError):
                continue
        try:
            found = _labelled(obj)
        except RecursionError:
            continue
        if found is not None:
            label, thought = found
            return Extraction(label, thought, True, how)
        if thought_seen is None and isinstance(obj, dict):
            thought_seen = _find_here(obj, THOUGHT_KEYS)
        pos = max(end, pos)

    m = _LABEL_PAIR.search(text)
    if m is not None:
        label = label_from_value(m.group(1))
        if label is not None:
            return Extraction(label, _thought_fallback(text, thought_seen), False, "regex")
    return Extraction(None, _thought_fallback(text, thought_seen), False, "none")


def _thought_fallback(text: str, seen: str | None) -> str:
    if seen:
        return seen
    m = _THOUGHT_PAIR.search(text)
    if m is not None:
        return _unescape(m.group(2)).strip()
    return text
