"""Part 1, sanity: CUDA visible, a bf16 matmul (accuracy and TFLOP/s), and the suite's CUDA-marked tests.

The CUDA-marked tests are the test files that use `pytest.mark.cuda` (tests/test_cuda.py and any other), run with
`-m cuda`; on CPU they all skip, which is what the smoke expects. Only those files are collected, so a test module
that needs a package the GPU machine lacks (fastapi, say) cannot break this part.
"""

from __future__ import annotations

import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from kit import ROOT, Context, check, importable

MARKER = re.compile(r"\bmark\.cuda\b")


def run(ctx: Context) -> dict:
    import torch

    figures, checks, notes = {}, [], []
    visible = torch.cuda.is_available()
    figures["cuda_visible"] = visible
    if ctx.profile.cuda:
        checks.append(check("CUDA visible", visible, "torch.cuda.is_available()" if visible else
                            f"torch {torch.__version__} sees no GPU (CUDA build: {torch.version.cuda}); "
                            "without a GPU, run with --cpu-smoke"))
        if not visible:
            return {"figures": figures, "checks": checks, "notes": notes}
        props = torch.cuda.get_device_properties(0)
        figures.update(device=props.name, capability=f"{props.major}.{props.minor}",
                       memory_gib=round(props.total_memory / 2**30, 1), cuda_version=torch.version.cuda,
                       bf16_supported=torch.cuda.is_bf16_supported(), device_count=torch.cuda.device_count())
        checks.append(check("bf16 supported", figures["bf16_supported"], props.name))
    mm = bf16_matmul(ctx.profile.matmul_n, ctx.device)
    if visible:
        torch.cuda.empty_cache()  # this process stays up for the whole run: its matrices go back to the device
    figures["bf16_matmul"] = mm
    checks.append(check("bf16 matmul accuracy", mm["rel_error"] <= 1e-2,
                        f"relative error {mm['rel_error']:.2e} against fp32 (limit 1e-2)"))
    tests = cuda_tests(ctx)
    figures["cuda_tests"] = tests
    if tests.get("skipped_part"):
        notes.append(tests["skipped_part"])  # the table shows it once, as a note
    else:
        ok = tests["returncode"] in (0, 5) and not tests["failed"] and not tests["errors"]
        if ctx.profile.cuda:
            ok = ok and tests["passed"] > 0
        checks.append(check("CUDA-marked tests", ok, tests["summary"]))
        if not ctx.profile.cuda:
            notes.append("the CUDA-marked tests skip without a GPU")
    return {"figures": figures, "checks": checks, "notes": notes}


def bf16_matmul(n: int, device: str) -> dict:
    """An n x n x n matmul in bf16 against the fp32 product (TF32 off), and its speed."""
    import torch

    from kit import timed

    torch.backends.cuda.matmul.allow_tf32 = False  # the reference must be true fp32
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device)
    b = torch.randn(n, n, generator=gen).to(device)
    ref = a @ b
    a16, b16 = a.bfloat16(), b.bfloat16()
    c = a16 @ b16
    rel = float((c.float() - ref).norm() / ref.norm())
    iters = 50 if device == "cuda" else 2
    out = torch.empty_like(a16)
    for _ in range(3):  # warm-up: cuBLAS picks its kernel on the first calls
        torch.matmul(a16, b16, out=out)
    _, seconds = timed(device, lambda: [torch.matmul(a16, b16, out=out) for _ in range(iters)])
    return {"n": n, "rel_error": rel, "tflops": round(2 * n**3 * iters / seconds / 1e12, 2)}


def marked_files() -> list[Path]:
    return sorted(p for p in (ROOT / "tests").glob("test_*.py") if MARKER.search(p.read_text(encoding="utf-8")))


def cuda_tests(ctx: Context) -> dict:
    """`pytest -m cuda` over the files that use the marker; counts from its JUnit XML."""
    if not importable("pytest"):
        return {"skipped_part": "pytest not importable: the CUDA-marked tests were not run (pip install pytest)"}
    files = marked_files()
    if not files:
        return {"skipped_part": "no test file uses pytest.mark.cuda"}
    xml = Path(ctx.out) / "cuda_tests.xml"
    log = Path(ctx.out) / "logs" / "cuda_tests.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [ctx.python, "-m", "pytest", "-q", "-m", "cuda", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}",
           *map(str, files)]
    with open(log, "w") as out:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=300).returncode
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if xml.is_file():
        for suite in ET.parse(xml).getroot().iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    summary = (f"{passed} passed, {counts['skipped']} skipped, {counts['failures']} failed, {counts['errors']} errors "
               f"in {', '.join(f.name for f in files)} (log {log.relative_to(ctx.out)})")
    return {"returncode": rc, "passed": passed, "skipped": counts["skipped"], "failed": counts["failures"],
            "errors": counts["errors"], "files": [f.name for f in files], "summary": summary}
