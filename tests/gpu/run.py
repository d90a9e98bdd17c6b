"""GPU verification kit: check the CUDA paths and measure the headline figures, in one command (tests/gpu/check.sh).

    tests/gpu/check.sh [--cpu-smoke] [--parts sanity,train,infer,confidence,resume] [--out DIR] [--work DIR]
                       [--budget-s S] [--isolate | --no-isolate] [--keep]

Parts (tests/gpu/part_*.py; each module's docstring says what it measures and how):
  sanity      CUDA visible, bf16 matmul accuracy and TFLOP/s, the suite's CUDA-marked tests
  train       the NLI recipe's training step on a Mistral-7B-architecture model: engine bf16 LoRA and 4-bit QLoRA,
              TRL's SFTTrainer, activation checkpointing on and off: tokens/s, step time, peak GPU memory
  infer       the generation path against transformers' generate (512 rows): rows/s, generations equal
  confidence  the confidence-token step at vocabulary 32k and 152k against full-logit masked loss
  resume      a training run SIGKILLed after a checkpoint and re-run ends with the uninterrupted run's weights

Writes DIR/results.json (every figure; rewritten after each part, so a killed run keeps what it measured) and
DIR/table.txt (also printed), logs under DIR/logs. Exit status: 0 when every correctness check passed, 1 when one
failed or a part broke, 2 for bad arguments, 3 when a package `app` needs is missing (one line says which).
A part whose package is absent (bitsandbytes, trl, flash-attn, pytest) is skipped and the output says so.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kit  # noqa: E402  (stdlib only at import)

# module -> pip name, light ones first; imported (not just found) so that a broken install counts as missing
REQUIRED = {"pydantic": "pydantic", "click": "click", "tqdm": "tqdm", "yaml": "pyyaml", "numpy": "numpy",
            "safetensors": "safetensors", "tokenizers": "tokenizers", "torch": "torch", "transformers": "transformers",
            "peft": "peft", "accelerate": "accelerate"}
HEAVY = ("torch", "transformers", "peft", "accelerate")
OPTIONAL = {"bitsandbytes": "the QLoRA setups are skipped", "trl": "the SFTTrainer setups are skipped",
            "flash_attn": "attention runs on SDPA", "pytest": "the CUDA-marked tests are skipped"}
PARTS = ("sanity", "train", "infer", "confidence", "resume")  # as the issue numbers them: JSON and table order
ORDER = ("sanity", "resume", "train", "infer", "confidence")  # run order: the cheap correctness checks first
ESTIMATE = {"train": "write_model", "infer": "infer", "confidence": "confidence", "resume": "resume"}


def missing_packages(modules=REQUIRED) -> list[str]:
    """pip names of the modules that do not import. The heavy ones are imported only when everything else is there:
    a missing light package is reported in a second, not after torch has loaded."""
    import contextlib
    import importlib.util
    import io

    def absent(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is None
        except (ImportError, ValueError):
            return True

    missing = [m for m in modules if absent(m)]
    with contextlib.redirect_stderr(io.StringIO()):  # import-time warnings of the probed libraries are not ours
        for stage in ([m for m in modules if m not in HEAVY], [m for m in modules if m in HEAVY]):
            if missing:
                break
            missing += [m for m in stage if m not in missing and not kit.importable(m)]
    return [modules[m] for m in missing]


def dependency_message(missing: list[str]) -> str:
    """One line: what is missing and how to install it (the GPU machine may have torch and transformers but not
    what `app` itself needs)."""
    return (f"tests/gpu/check.sh: {sys.executable} lacks {', '.join(missing)}, which the project needs: "
            f"pip install {' '.join(missing)} (or `pip install -e .` from the repository root; without network, "
            f"carry wheels as tests/gpu/README.md shows)")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="tests/gpu/check.sh", description=__doc__.split("\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (under 2 minutes): proves the "
                   "script runs; its figures mean nothing")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--out", help="results folder (default results/gpu-check-<time>/ in the repository)")
    p.add_argument("--work", help="scratch folder for models and runs (kept, and its models reused by the next run; "
                   "default: a temporary folder, removed at the end)")
    p.add_argument("--budget-s", type=float, help="skip parts and setups that would end after this many seconds "
                   "(default 450 on CUDA, 600 for the smoke)")
    iso = p.add_mutually_exclusive_group()
    iso.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                     help="each measured unit in its own process (default on CUDA: clean memory figures)")
    iso.add_argument("--no-isolate", dest="isolate", action="store_false", help="everything in this process "
                     "(default for the smoke: no process start-up per unit)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    p.add_argument("--unit", help=argparse.SUPPRESS)
    p.add_argument("--ctx", help=argparse.SUPPRESS)
    p.add_argument("--kwargs", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    parts = [x for x in args.parts.split(",") if x]
    unknown = [x for x in parts if x not in PARTS]
    if unknown or not parts:
        p.error(f"--parts: unknown {unknown or 'empty list'}; choose from {','.join(PARTS)}")
    args.parts = parts
    return args


def offline_environment(smoke: bool) -> None:
    """No network, no progress bars; the smoke hides any GPU so that it runs the CPU path on every machine."""
    if smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[name] = "1"
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    for dist in ("transformers", "peft", "accelerate", "trl", "bitsandbytes", "flash-attn", "pydantic", "pytest"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=kit.ROOT, capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["commit"] = None
    return out


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def run_part(ctx: kit.Context, name: str) -> dict:
    """One part, never raising: a part that breaks is recorded as an error (traceback in logs/part_NAME.log)."""
    t0 = time.time()
    try:
        res = importlib.import_module(f"part_{name}").run(ctx)
        res["status"] = "failed" if any(not c["ok"] for c in res["checks"]) else "ok"
    except Exception as err:
        log = Path(ctx.out) / "logs" / f"part_{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(traceback.format_exc())
        line = (str(err).strip().splitlines() or [""])[0]
        res = {"status": "error", "figures": {}, "notes": [],
               "checks": [kit.check(f"{name} runs", False, f"{type(err).__name__}: {line} (traceback in {log})")]}
    res["seconds"] = round(time.time() - t0, 1)
    return res


def skipped(why: str) -> dict:
    return {"status": "skipped", "why": why, "figures": {}, "checks": [], "notes": [], "seconds": 0.0}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.unit:
        return kit.run_unit_main(args.unit, args.ctx, args.kwargs, args.result)
    offline_environment(args.cpu_smoke)
    missing = missing_packages()
    if missing:
        print(dependency_message(missing), file=sys.stderr)
        return 3
    kit.use_repo_imports()
    kit.quiet_libraries()
    import dataclasses

    from table import render

    profile = kit.SMOKE_PROFILE if args.cpu_smoke else kit.CUDA_PROFILE
    if args.budget_s:
        profile = dataclasses.replace(profile, budget_s=args.budget_s)
    out = Path(args.out or kit.ROOT / "results" / f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    temporary = args.work is None
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-kit-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    isolate = profile.cuda if args.isolate is None else args.isolate
    ctx = kit.Context(profile, str(work), str(out), kit.find_fixtures(), isolate, time.time())
    results = {"kit": "tests/gpu/check.sh", "mode": profile.name, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "environment": versions(), "fixtures": dataclasses.asdict(ctx.fixtures),
               "optional_packages": {m: not missing_packages({m: m}) for m in OPTIONAL},
               "profile": dataclasses.asdict(profile),
               "isolated_units": isolate, "parts": {}}
    for module, what in OPTIONAL.items():
        if not results["optional_packages"][module]:
            print(f"note: {module} not importable: {what}", flush=True)
    if ctx.fixtures.fallback:
        print(f"note: fixtures {ctx.fixtures.where}", flush=True)
    try:
        ctx.files["train_csv"] = kit.write_train_csv(ctx)
        for name in [p for p in ORDER if p in args.parts]:
            sanity = results["parts"].get("sanity", {})
            if profile.cuda and sanity and not sanity["figures"].get("cuda_visible", True):
                part = skipped("CUDA not visible")
            elif name != "sanity" and ctx.over_budget(ESTIMATE.get(name, "")):
                part = skipped(f"time budget ({profile.budget_s:.0f} s)")
            else:
                print(f"[{ctx.elapsed():5.0f} s] {name} ...", flush=True)
                part = run_part(ctx, name)
            results["parts"][name] = part
            for c in part["checks"]:
                print(f"    {'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}", flush=True)
            results["parts"] = {p: results["parts"][p] for p in PARTS if p in results["parts"]}
            results["seconds"] = round(ctx.elapsed(), 1)
            write_json(out / "results.json", results)
    finally:
        if temporary and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    checks = [dict(c, part=p) for p, r in results["parts"].items() for c in r["checks"]]
    results.update(checks=checks, ok=all(c["ok"] for c in checks), seconds=round(ctx.elapsed(), 1))
    write_json(out / "results.json", results)
    table = render(results)
    (out / "table.txt").write_text(table + "\n")
    print("\n" + table)
    print(f"\nresults: {out / 'results.json'}  table: {out / 'table.txt'}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
