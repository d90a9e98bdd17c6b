"""Raw questions of the confidence-token task: domains and their tokens, BoolQ/MedQA-style rows, answer parsing, prompts."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from app.config import Config
from app.data import Row, read_rows
from app.errors import UserError

YES_NO = "yes_no"
CHOICE = "choice"
_LETTERS = "ABCDEFGHIJ"
_TRUE = {"true", "yes", "1"}
_FALSE = {"false", "no", "0"}


# --- domains -------------------------------------------------------------------------------------------------------
def domain_tokens(cfg: Config) -> dict[str, tuple[str, str]]:
    """dataset -> (confident, unconfident), checked: two distinct tokens each, no token both C and U."""
    if not cfg.confidence_tokens:
        raise UserError("confidence_tokens: no datasets configured (dataset -> [confident token, unconfident token])")
    pairs, role = {}, {}
    for name, pair in cfg.confidence_tokens.items():
        if len(pair) != 2 or not all(t.strip() for t in pair) or pair[0] == pair[1]:
            raise UserError(f"confidence_tokens[{name!r}]: need two distinct non-empty tokens [confident, unconfident], "
                            f"found {pair!r}")
        for token, kind in zip(pair, "CU"):
            if role.setdefault(token, kind) != kind:
                raise UserError(f"confidence_tokens: {token!r} is a confident token in one dataset and an unconfident "
                                "token in another")
        pairs[name] = (pair[0], pair[1])
    return pairs


def all_tokens(cfg: Config) -> list[str]:
    return list(dict.fromkeys(t for pair in domain_tokens(cfg).values() for t in pair))


# --- raw questions -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QA:
    """One raw question, normalised."""

    dataset: str
    kind: str  # YES_NO or CHOICE
    text: str  # the question text shown to the model (passage / options included)
    gold: str  # "yes" / "no", or an option letter
    options: dict = field(default_factory=dict)  # letter -> option text (CHOICE)
    line: int = 0


def _bool_answer(value, path, line) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and value in (0, 1):
        return "yes" if value else "no"
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return "yes" if value.strip().lower() in _TRUE else "no"
    raise UserError(f"{path}:{line}: answer must be true or false (or yes/no, 1/0), found {value!r}")


def _options(values: dict, path, line) -> dict[str, str]:
    raw = values.get("options")
    if raw is None:
        raw = {k: values[k] for k in _LETTERS if k in values and values[k] not in (None, "")}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{line}: options must be an object {{\"A\": text, ...}} or a list, "
                            f"found {raw[:60]!r}") from None
    if isinstance(raw, list):
        if len(raw) > len(_LETTERS):
            raise UserError(f"{path}:{line}: {len(raw)} options; at most {len(_LETTERS)} are supported")
        raw = dict(zip(_LETTERS, raw))
    if not isinstance(raw, dict):
        raise UserError(f"{path}:{line}: options must be an object {{\"A\": text, ...}} or a list, found {raw!r}")
    options = {}
    for key, text in raw.items():
        letter = str(key).strip().upper()
        if len(letter) != 1 or letter not in _LETTERS:
            raise UserError(f"{path}:{line}: option key {key!r} is not a letter A-{_LETTERS[-1]}")
        if not isinstance(text, (str, int, float)) or not str(text).strip():
            raise UserError(f"{path}:{line}: option {letter} must be non-empty text, found {text!r}")
        options[letter] = str(text).strip()
    if len(options) < 2:
        raise UserError(f"{path}:{line}: a multiple-choice question needs at least two options, found {len(options)}")
    return dict(sorted(options.items()))


def _letter_answer(values: dict, options: dict, path, line) -> str:
    value = values.get("answer_idx", values.get("answer"))
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{path}:{line}: answer must be an option letter ({', '.join(options)}), found {value!r}")
    text = value.strip()
    m = re.fullmatch(r"[\(\[]?([A-Ja-j])[\)\].]?", text)
    if m and m.group(1).upper() in options:
        return m.group(1).upper()
    same = [k for k, v in options.items() if v.lower() == text.lower()]
    if len(same) == 1:
        return same[0]
    raise UserError(f"{path}:{line}: answer {value!r} is not one of the option letters {', '.join(options)} "
                    "(nor exactly one option's text)")


def yes_no_text(question: str, passage: str | None) -> str:
    q = question.strip()
    q = q[0].upper() + q[1:] if q else q
    if not q.endswith("?"):
        q += "?"
    head = f"{passage.strip()}\n\n" if passage and passage.strip() else ""
    return f"{head}Question: {q} Answer yes or no."


def choice_text(question: str, options: dict[str, str]) -> str:
    lines = [question.strip(), *(f"{k}. {v}" for k, v in options.items())]
    return "\n".join(lines) + "\nAnswer with the letter of the correct option."


def read_raw_qa(path, dataset: str | None, pairs: dict, limit: int | None = None, *, fallback: str | None = None,
                need_answer: bool = True, required: tuple[str, ...] = ()) -> list[tuple[Row, str, object]]:
    """(row, dataset, parsed QA) for each raw row of a file; the dataset is `dataset`, else the row's column, else
    `fallback`, and must have tokens in `pairs`; `need_answer` and the `required` columns as raw_qa and read_rows
    take them. UserError naming file and line for anything unusable."""
    rows = read_rows(path, required + (() if dataset or fallback else ("dataset",)))
    out = []
    for row in rows[:limit]:
        name = dataset or row.values.get("dataset") or fallback
        if name not in pairs:
            raise UserError(f"{path}:{row.line}: dataset {name!r} has no tokens in confidence_tokens "
                            f"(known: {', '.join(pairs)})")
        out.append((row, name, raw_qa(row.values, name, path, row.line, need_answer)))
    return out


def raw_qa(values: dict, dataset: str, path, line: int, need_answer: bool = True) -> QA:
    """Normalise one raw QA row; UserError naming file and line when it is not usable. With `need_answer=False`
    (questions to predict) a row without an answer gets `gold = ""`, which no parsed answer equals."""
    question = values.get("question")
    if not isinstance(question, str) or not question.strip():
        raise UserError(f"{path}:{line}: question must be non-empty text, found {question!r}")
    if "options" in values or ("A" in values and "B" in values):
        options = _options(values, path, line)
        unanswered = not need_answer and values.get("answer_idx", values.get("answer")) in (None, "")
        gold = "" if unanswered else _letter_answer(values, options, path, line)
        return QA(dataset, CHOICE, choice_text(question, options), gold, options, line)
    if "answer" not in values and need_answer:
        raise UserError(f"{path}:{line}: missing answer (true/false for a yes/no question; add options for a "
                        "multiple-choice one)")
    passage = values.get("passage")
    if passage is not None and not isinstance(passage, str):
        raise UserError(f"{path}:{line}: passage must be text, found {passage!r}")
    answer = values.get("answer")
    gold = "" if not need_answer and answer in (None, "") else _bool_answer(answer, path, line)
    return QA(dataset, YES_NO, yes_no_text(question, passage), gold, {}, line)


# --- answer parsing ------------------------------------------------------------------------------------------------
_SPECIAL = re.compile(r"<\|[^|>]*\|>|</?s>|<pad>|<unk>|<eos>|<[CU]_[A-Za-z0-9_]+>")
_YES_NO = re.compile(r"\b(yes|no|true|false)\b", re.IGNORECASE)


def parse_yes_no(text: str) -> str | None:
    """'yes' / 'no' from the first yes/no/true/false word of a generation, else None."""
    m = _YES_NO.search(_SPECIAL.sub(" ", text or ""))
    if not m:
        return None
    return "yes" if m.group(1).lower() in ("yes", "true") else "no"


def parse_choice(text: str, options: dict[str, str]) -> str | None:
    """The option letter a generation chose ("C", "(C)", "C.", "The answer is C", or exactly one option's text)."""
    text = _SPECIAL.sub(" ", text or "").strip()
    if not text or not options:
        return None
    letters = "".join(options)
    cls = f"[{letters}]"
    patterns = [
        rf"\b(?i:answer|option|choice)\b(?:\s+(?i:is|would be|:))?\s*:?\s*(?i:option\s+)?[\(\[]?({cls})[\)\]]?(?![A-Za-z])",
        rf"^[*_\s]*[\(\[]?({cls})[\)\]]?[*_]*(?:[.:)]|\s*$|\s+[-–:])",
        rf"[\(\[]({cls})[\)\]]",
        rf"(?<![A-Za-z])({cls})[.)](?=\s|$)",
    ]
    for pattern in patterns:
        m = re.search(pattern, text)
        if m:
            return m.group(1)
    low = text.lower()
    found = [k for k, v in options.items() if re.search(rf"(?<!\w){re.escape(v.lower())}(?!\w)", low)]
    return found[0] if len(found) == 1 else None


def parse_answer(qa: QA, text: str) -> str | None:
    return parse_yes_no(text) if qa.kind == YES_NO else parse_choice(text, qa.options)


def answer_text(qa: QA, answer: str) -> str:
    """How a normalised answer is written ("Yes", "No", "C")."""
    return answer.capitalize() if qa.kind == YES_NO else answer


def wrong_answer(qa: QA) -> str:
    if qa.kind == YES_NO:
        return "no" if qa.gold == "yes" else "yes"
    letters = list(qa.options)
    return letters[(letters.index(qa.gold) + 1) % len(letters)]


# --- prompts -------------------------------------------------------------------------------------------------------
def build_prompt(text: str, tokenizer, cfg: Config) -> tuple[str, bool]:
    """(prompt, add_special_tokens) for a question text."""
    if cfg.confidence_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("confidence_chat_template=True but the tokenizer has no chat template")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                               add_generation_prompt=True)
        return prompt, False  # the template writes its own BOS where the model wants one
    return cfg.confidence_prompt.replace("{question}", text), True


def prompt_ids(text: str, tokenizer, cfg: Config) -> list[int]:
    prompt, special = build_prompt(text, tokenizer, cfg)
    return tokenizer(prompt, add_special_tokens=special).input_ids


def answer_ids(answer: str, tokenizer, cfg: Config) -> list[int]:
    """Answer tokens after the prompt: a space first unless the prompt ends in whitespace (chat templates do)."""
    answer = answer.strip()
    if not answer:
        return []
    ends_in_space = cfg.confidence_chat_template or cfg.confidence_prompt.replace("{question}", "x")[-1:].isspace()
    return tokenizer(("" if ends_in_space else " ") + answer, add_special_tokens=False).input_ids


def fit_prompt(ids: list[int], limit: int) -> list[int]:
    """Keep the first token (BOS) and the tail (question, instruction) when a prompt is longer than `limit`."""
    if len(ids) <= limit or limit < 2:
        return ids
    return ids[:1] + ids[len(ids) - (limit - 1):]
