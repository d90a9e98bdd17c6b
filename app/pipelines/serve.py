"""`transformers serve` on a local model directory for the tiny NLI pipeline: started on a free port of 127.0.0.1,
stopped when the pipeline no longer needs it (or fails)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from app.errors import UserError

START_TIMEOUT_S = 180
API_KEY_ENV = "PIPELINE_SERVER_KEY"  # the cot client needs a key variable; a local server ignores it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def transformers_serve(model_dir: Path, log_path: Path):
    """Yield the base URL (http://127.0.0.1:PORT/v1) of `transformers serve MODEL_DIR` on the CPU."""
    exe = Path(sys.executable).with_name("transformers")
    if not exe.is_file():
        raise UserError(f"no `transformers` console script beside {sys.executable}: the tiny NLI pipeline serves its "
                        "teacher with `transformers serve` (pip install 'transformers[serving]')")
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen([str(exe), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                                 "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not _listening(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log_path.read_text(encoding="utf-8", errors="replace")[-400:].strip().splitlines()
                    raise UserError(f"transformers serve did not start on 127.0.0.1:{port} (log {log_path}): "
                                    f"{tail[-1] if tail else 'no output'}")
                time.sleep(0.3)
            print(f"serving {model_dir} on http://127.0.0.1:{port}/v1 (log {log_path})", file=sys.stderr)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):  # a second Ctrl-C must not leave it running
                proc.kill()
                proc.wait()
