"""Task-owned head weights (a score head, a regression head) saved beside the model's, as safetensors.

Loading is strict: the file must hold exactly the head's keys with the head's shapes, else one line naming the file,
the mismatch and the setting to check.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from app.errors import UserError


def save_head_file(head: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", **(metadata or {})})
    return path


def load_head_file(head: nn.Module, path: Path, what: str, settings: str) -> None:
    """Load `path` into `head`; `what` names the checkpoint kind, `settings` the config fields that shape the head."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"{path}: missing (a {what} checkpoint holds the head's weights there)")
    state = load_file(str(path))
    expected = head.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"{path}: head weights do not match the configured head (missing: {missing or 'none'}; "
                        f"unexpected: {unexpected or 'none'}); check {settings}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise UserError(f"{path}: {k} has shape {tuple(state[k].shape)}, the configured head expects "
                            f"{tuple(v.shape)}; check {settings} and the model")
    head.load_state_dict(state, strict=True)
