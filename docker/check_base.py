"""Build-time guard: does the base image carry the Python/torch/CUDA that the pins were chosen for?

Run inside `docker build` (Dockerfile.train, Dockerfile.infer) before anything is installed, so that
a changed base tag fails at once with the reason instead of producing an image whose flash-attn or
vLLM wheels do not load:

    python docker/check_base.py --constraints docker/constraints.txt --python 3.12 --cuda 12.6
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path


def pinned_torch(constraints: Path) -> str:
    for line in constraints.read_text().splitlines():
        m = re.match(r"\s*torch\s*==\s*([^\s;#]+)", line)
        if m:
            return m.group(1)
    raise SystemExit(f"{constraints}: no torch==X pin")


def problems(want_python: str, want_torch: str, want_cuda: str | None, need_cxx11_abi: bool) -> list[str]:
    import torch

    found = []
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    if python != want_python:
        found.append(f"Python {python}, expected {want_python} (the locks and the flash-attn wheel are cp{want_python.replace('.', '')})")
    version = torch.__version__.split("+")[0]
    if version != want_torch:
        found.append(f"torch {torch.__version__}, expected {want_torch} (docker/constraints.txt)")
    if want_cuda is not None:
        cuda = torch.version.cuda or "none"
        if cuda != want_cuda and not cuda.startswith(want_cuda + "."):
            found.append(f"torch built for CUDA {cuda}, expected {want_cuda}")
    if need_cxx11_abi and not torch.compiled_with_cxx11_abi():
        found.append("torch built without the C++11 ABI; the flash-attn wheel needs cxx11abi=TRUE")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--constraints", type=Path, required=True, help="file with the torch==X pin")
    parser.add_argument("--python", required=True, help="expected MAJOR.MINOR")
    parser.add_argument("--cuda", default=None, help="expected CUDA MAJOR.MINOR of the torch build")
    parser.add_argument("--no-cxx11-abi-check", action="store_true", help="skip the C++11 ABI check")
    args = parser.parse_args(argv)
    found = problems(args.python, pinned_torch(args.constraints), args.cuda, not args.no_cxx11_abi_check)
    if found:
        print("base image does not match the pins:\n  " + "\n  ".join(found), file=sys.stderr)
        return 1
    import torch

    print(f"base image ok: Python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
