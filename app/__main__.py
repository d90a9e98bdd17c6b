"""`python -m app COMMAND ...`: the single entry point used by the run scripts and containers."""

from __future__ import annotations

import importlib
import sys

from app.errors import UserError

# command -> (module, one-line help). Modules are imported lazily so that `score` never imports torch.
COMMANDS = {
    "train": ("app.engine.loop", "train a model from a config module: train CONFIG.py [--key=value ...]"),
    "config": ("app.config", "print the resolved, validated config: config CONFIG.py [--key=value ...]"),
    "tiny-model": ("app.lm.tiny", "write the embedded tiny model and tokenizer: tiny-model DIR"),
    "infer": ("app.infer", "batched inference on a CSV/JSONL: infer INPUT [--checkpoint DIR] [--output FILE]"),
    "score": ("app.score", "score predictions against gold labels: score --pred FILE --gold FILE"),
    "tag": ("app.tasks.confidence_tokens.tag", "confidence-token training rows from raw QA + a model: tag INPUT --output OUT.jsonl [...]"),
    "score-steps": ("app.tasks.confidence_head.score_steps", "per-step confidences of step solutions: score-steps INPUT [--checkpoint DIR]"),
}


def usage() -> str:
    lines = ["usage: python -m app COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.cli(rest) or 0)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
