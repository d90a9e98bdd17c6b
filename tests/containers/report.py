"""results.json and table.txt of a container kit run, from the checks.jsonl that check.sh appends to."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(checks: list[dict]) -> str:
    width = max((len(c["check"]) for c in checks), default=5)
    lines = [f"{'check':<{width}}  status  seconds  detail"]
    for c in checks:
        lines.append(f"{c['check']:<{width}}  {c['status']:<6}  {c['seconds']:>7.1f}  {c['detail']}")
    failed = [c["check"] for c in checks if c["status"] == "fail"]
    lines.append(f"{len(checks) - len(failed)} passed or skipped, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    return "\n".join(lines) + "\n"


def main(jsonl: str, out: str) -> None:
    checks = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    out_dir = Path(out)
    (out_dir / "results.json").write_text(json.dumps({"checks": checks, "failed": [c["check"] for c in checks
                                                                                   if c["status"] == "fail"]}, indent=2))
    text = table(checks)
    (out_dir / "table.txt").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main(*sys.argv[1:3])
