"""The README is a front door: short, every command `python -m app --help` lists in its command table, and every
relative link of the project's READMEs and docs/ pointing at a file (and a heading) that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.cli import cli
from conftest import ROOT, run_app

FRONT_DOOR_LIMIT = 15_000  # characters: details live in the READMEs the front door links to
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def documents() -> list[Path]:
    """README.md, docs/*.md and every README.md under app/, docker/ and tests/ (checkpoints' model cards excluded)."""
    found = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for folder in ("app", "docker", "tests"):
        found += sorted((ROOT / folder).rglob("README.md"))
    return found


def command_table(readme: str) -> str:
    """The rows of the front door's command table (the table under `## Commands`)."""
    section = readme.split("\n## Commands", 1)[1].split("\n## ", 1)[0]
    return "\n".join(line for line in section.splitlines() if line.startswith("|"))


def listed_commands(group, prefix: tuple[str, ...] = ()) -> list[str]:
    """Every command path the CLI's --help lists: `train`, `cot generate`, ..."""
    out = []
    ctx = group.make_context("python -m app", [], resilient_parsing=True)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        out.append(" ".join((*prefix, name)))
        if hasattr(command, "list_commands"):
            out += listed_commands(command, (*prefix, name))
    return out


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def relative_links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # no http:, mailto:, ...


def test_front_door_is_short():
    size = len((ROOT / "README.md").read_text(encoding="utf-8"))
    assert size <= FRONT_DOOR_LIMIT, f"README.md has {size} characters; move details to the READMEs it links to"


def test_every_listed_command_is_in_the_command_table():
    result = run_app("--help", timeout=120)
    assert result.returncode == 0, result.stderr
    top = re.findall(r"^  (\S+)", result.stdout.split("Commands:", 1)[1], re.M)
    commands = listed_commands(cli)
    assert [c for c in commands if " " not in c] == top  # what --help lists, and below it the groups' subcommands
    assert len(commands) > len(top)
    table = command_table((ROOT / "README.md").read_text(encoding="utf-8"))
    missing = [c for c in commands if not re.search(rf"python -m app {re.escape(c)}(?![\w-])", table)]
    assert not missing, f"README.md's command table lacks: {missing}"


def test_the_wrappers_and_compose_are_in_the_command_table():
    table = command_table((ROOT / "README.md").read_text(encoding="utf-8"))
    for entry in ("./run_training.sh", "./run_inference.sh", "./run_tests.sh", "docker compose"):
        assert entry in table, entry


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_and_headings_that_exist(doc):
    broken = []
    for target in relative_links(doc):
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{doc.relative_to(ROOT)}: {broken}"


def test_the_link_checker_sees_a_broken_link(tmp_path):
    doc = tmp_path / "README.md"
    doc.write_text("# Top\n\n[ok](README.md#top) [gone](nope.md) ![img](x.png) [web](https://example.com)\n"
                   "```\n[in a fence](nothing.md)\n```\n")
    assert relative_links(doc) == ["README.md#top", "nope.md"]
    assert slug("Data path: `data_load.py`") == "data-path-data_loadpy" and "top" in anchors(doc)
