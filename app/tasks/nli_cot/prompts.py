"""Prompt and target text of the NLI chain-of-thought task (training, evaluation and inference share them)."""

from __future__ import annotations

import json

from app.errors import UserError


def build_prompt(row: dict, cfg) -> str:
    try:
        return cfg.prompt_template.format(premise=row.get("premise") or "", hypothesis=row.get("hypothesis") or "")
    except (KeyError, IndexError, ValueError) as err:
        raise UserError(f"prompt_template: cannot fill it ({err}); use {{premise}} and {{hypothesis}}") from None


def build_target(label: int, thought: str | None) -> str:
    obj = {"thought_process": thought, "predicted_label": label} if thought else {"predicted_label": label}
    return json.dumps(obj, ensure_ascii=False)
