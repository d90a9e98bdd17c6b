"""`python -m app verify RUN_DIR | CHECKPOINT_DIR`: check checkpoints before trusting a week of training to them.

Every checkpoint of a run directory (RUN/checkpoints/*, temp and replaced ones skipped), or one checkpoint
directory, goes through `checkpoint.verify_checkpoint` (manifest sizes and sha256, safetensors headers, JSON,
tokenizer, no pickle-only weights; manifest entries only inside the checkpoint) and must hold a readable
trainer_state.json. One line per checkpoint: `ok` on stdout, or `error: ` and the problem (naming the file) on
stderr; exit code 0 when all pass, 2 otherwise.
"""

from __future__ import annotations

from pathlib import Path

import click

from app.errors import UserError


def checkpoint_dirs(path: Path) -> list[Path]:
    """The checkpoints of a run directory (one holding checkpoints/), else the directory itself."""
    root = path / "checkpoints"
    if not root.is_dir():
        return [path]
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".tmp-", ".old-")))


def verify_run(path: str | Path) -> list[tuple[Path, str | None]]:
    """(checkpoint directory, None when it passes or the one-line problem) for each checkpoint under `path`."""
    from app import checkpoint as ckpt

    results = []
    for directory in checkpoint_dirs(Path(path)):
        try:
            ckpt.verified_step(directory)
            results.append((directory, None))
        except UserError as err:
            results.append((directory, str(err)))
    return results


@click.command("verify", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.pass_context
def verify_command(ctx: click.Context, path: Path) -> None:
    """Check every checkpoint of a run directory (RUN/checkpoints/*), or one checkpoint directory.

    Files are compared with the checkpoint's manifest.json (sizes and sha256); checkpoints written before
    manifests existed get the cheap checks (JSON files, safetensors headers, tokenizer files). Prints one line
    per checkpoint, `ok` or `error: ` and what is wrong; exit code 0 when all pass, 2 otherwise.
    """
    from app import checkpoint as ckpt

    results = verify_run(path)
    if not results:
        click.echo(f"error: {path / 'checkpoints'}: no checkpoints", err=True)
        ctx.exit(2)
    for directory, problem in results:
        if problem is not None:
            click.echo(f"error: {problem}", err=True)
        elif (directory / ckpt.MANIFEST).is_file():
            click.echo(f"{directory}: ok")
        else:
            click.echo(f"{directory}: ok (no {ckpt.MANIFEST}: written before manifests, checksums not checked)")
    ctx.exit(0 if all(problem is None for _, problem in results) else 2)
