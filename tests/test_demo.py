"""`python -m app demo`: the demo page on 127.0.0.1, over HTTP and in a real headless Chromium.

NLI (the session's tiny checkpoint), confidence_tokens and confidence_head (2-step tiny checkpoints trained here): a
pair gives the label and reasoning, and for the confidence tasks the confidence, equal to what `python -m app infer`
writes for the same row; a file upload returns the `infer` predictions file; a bad request is a 4xx with a message in
the page, the server answering the next request, and every response carries the security headers; a port in use is
one line before anything else.
The browser tests drive Debian's `chromium` through the Chrome DevTools protocol over a pipe
(`--remote-debugging-pipe`: standard library only): they type the fields, click Predict, read the result and save
screenshots to test-artifacts/ (or $TEST_ARTIFACTS). Skipped, saying why, without a browser.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from app.pipelines.serve import free_port
from conftest import ROOT, run_app

ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS") or ROOT / "test-artifacts")
PAIR = ("The lamp is in the kitchen.", "The lamp is indoors.")
MAX_NEW_TOKENS = 12



@pytest.fixture(scope="module")
def checkpoint(tiny_final_checkpoint) -> Path:
    return tiny_final_checkpoint


def demo_server(checkpoint: Path, log_dir: Path):
    """`python -m app demo` on `checkpoint` in a subprocess; yields its base URL once /health answers."""
    port = free_port()
    log = open(log_dir / "demo.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "app", "demo", "--checkpoint", str(checkpoint), "--port", str(port),
                             f"--max_new_tokens={MAX_NEW_TOKENS}"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"demo exited {proc.returncode}: {log.read()[-2000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    assert json.loads(r.read())["status"] == "ok"
                    break
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                if time.monotonic() > deadline:
                    pytest.fail("demo did not come up in 180 s")
                time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    yield from demo_server(checkpoint, tmp_path_factory.mktemp("demolog"))


def fetch(url: str, method: str = "GET", data: bytes | None = None, content_type: str | None = None):
    """(status, headers, body) of one request; an error status is an answer like any other."""
    headers = {"Content-Type": content_type} if content_type else {}
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def post(url: str, data: bytes, content_type: str) -> tuple[int, str, bytes]:
    status, headers, body = fetch(url, "POST", data, content_type)
    return status, headers.get("Content-Type", ""), body


SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}


def assert_security_headers(headers) -> None:
    """The headers every response carries; the policy allows no script, no framing, no other origin."""
    for name, value in SECURITY_HEADERS.items():
        assert headers.get(name) == value, (name, headers.get(name))
    csp = {d.split()[0]: d.split()[1:] for d in headers.get("Content-Security-Policy", "").split(";") if d.strip()}
    assert csp["default-src"] == ["'none'"] and csp["frame-ancestors"] == ["'none'"]
    assert csp["form-action"] == ["'self'"] and csp["base-uri"] == ["'none'"]
    assert "script-src" not in csp  # no script at all (default-src 'none')
    assert len(csp["style-src"]) == 1 and csp["style-src"][0].startswith("'sha256-")  # the page's own style only


def form(base: str, premise: str, hypothesis: str):
    body = urllib.parse.urlencode({"premise": premise, "hypothesis": hypothesis}).encode()
    return post(base + "/predict", body, "application/x-www-form-urlencoded")


BOUNDARY = "----demo-test-boundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
FORM = "application/x-www-form-urlencoded"


def multipart_body(content: bytes, filename: str = "pairs.csv", field: str = "file") -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: text/csv\r\n\r\n").encode() + content + f"\r\n--{BOUNDARY}--\r\n".encode()


def multipart(base: str, content: bytes, filename: str = "pairs.csv"):
    return post(base + "/batch", multipart_body(content, filename), MULTIPART)


def assert_no_traceback(text: str) -> None:
    assert "Traceback" not in text and 'File "' not in text


def test_pair_gives_label_and_reasoning(server):
    status, headers, body = fetch(server + "/predict", "POST", urllib.parse.urlencode(
        {"premise": PAIR[0], "hypothesis": PAIR[1]}).encode(), FORM)
    page = body.decode()
    assert status == 200, page
    assert 'id="label">0<' in page or 'id="label">1<' in page
    assert 'id="reasoning"' in page and PAIR[0] in page
    assert_security_headers(headers)


def test_csv_batch_returns_predictions(server):
    rows = "id,premise,hypothesis\na,The cup is in the garden.,The cup is indoors.\nb,The pen is in the office.,The pen is indoors.\n"
    status, headers, body = fetch(server + "/batch", "POST", multipart_body(rows.encode()), MULTIPART)
    assert status == 200 and "text/csv" in headers["Content-Type"], body[:500]
    out = list(csv.DictReader(io.StringIO(body.decode())))
    assert [r["id"] for r in out] == ["a", "b"]
    assert all(r["predicted_label"] in ("0", "1") for r in out)
    assert_security_headers(headers)  # nosniff: the CSV is never rendered as a page


@pytest.mark.parametrize("path", ["/", "/health"])
def test_every_page_carries_the_security_headers(server, path):
    status, headers, _ = fetch(server + path)
    assert status == 200
    assert_security_headers(headers)


def form_body(**fields: str) -> bytes:
    return urllib.parse.urlencode(fields).encode()


PAIRS_HEADER = b"premise,hypothesis\n"
# one row per bad request: method, path, body, content type, the 4xx it gets, what the page's message says
BAD_REQUESTS = [
    pytest.param("GET", "/nope", None, None, 404, "404: Not Found", id="unknown-path"),
    pytest.param("DELETE", "/predict", None, None, 405, "405: Method Not Allowed", id="delete-predict"),
    pytest.param("PUT", "/", b"x", "text/plain", 405, "405: Method Not Allowed", id="put-page"),
    pytest.param("POST", "/health", b"{}", "application/json", 405, "405: Method Not Allowed", id="post-health"),
    pytest.param("GET", "/batch", None, None, 405, "405: Method Not Allowed", id="get-batch"),
    pytest.param("POST", "/predict", form_body(premise="", hypothesis="The lamp is indoors."), FORM, 400,
                 "premise is empty", id="empty-premise"),
    pytest.param("POST", "/predict", form_body(premise="The lamp is in the kitchen.", hypothesis="   "), FORM, 400,
                 "hypothesis is empty", id="blank-hypothesis"),
    pytest.param("POST", "/predict", form_body(hypothesis="The lamp is indoors."), FORM, 400, "premise is empty",
                 id="missing-premise"),
    pytest.param("GET", "/predict?premise=A+lamp.", None, None, 400, "hypothesis is empty", id="query-no-hypothesis"),
    pytest.param("POST", "/predict", form_body(premise="x" * 1_000_000, hypothesis="h"), FORM, 400,
                 "premise is too long (1,000,000 characters; at most 20,000)", id="field-too-long"),
    pytest.param("POST", "/predict", b"premise=" + b"x" * 5_000_001, FORM, 413, "the request is too large",
                 id="form-over-5MB"),
    pytest.param("POST", "/predict", b"premise=\xff\xfe&hypothesis=h", FORM, 400, "the form is not UTF-8 text",
                 id="form-not-utf8"),
    pytest.param("POST", "/batch", form_body(premise="a", hypothesis="b"), FORM, 400,
                 "upload a file with the form (multipart/form-data)", id="batch-not-multipart"),
    pytest.param("POST", "/batch", multipart_body(b"premise,hypothesis\na,b\n", field="other"), MULTIPART, 400,
                 "no file uploaded", id="batch-no-file-field"),
    pytest.param("POST", "/batch", multipart_body(b"   "), MULTIPART, 400, "the uploaded file is empty",
                 id="batch-empty-file"),
    pytest.param("POST", "/batch", multipart_body(b"question,answer\nfoo,bar\n"), MULTIPART, 400,
                 "missing column(s) premise", id="batch-missing-columns"),
    pytest.param("POST", "/batch", multipart_body(PAIRS_HEADER + b"A cat sleeps.,An animal sleeps.\n" * 2001),
                 MULTIPART, 400, "2001 rows; the demo predicts at most 2000", id="batch-too-many-rows"),
    pytest.param("POST", "/batch", multipart_body(PAIRS_HEADER + b"a,b\n" * 1_300_000), MULTIPART, 413,
                 "the request is too large", id="batch-over-5MB"),
]


def error_message(page: str) -> str:
    assert 'id="error"' in page, page[:500]
    return html.unescape(page.split('id="error"', 1)[1].split(">", 1)[1].split("</div>", 1)[0])


@pytest.mark.parametrize("method,path,body,content_type,status,message", BAD_REQUESTS)
def test_bad_request_is_a_4xx_with_a_message_and_the_server_serves_on(server, method, path, body, content_type,
                                                                      status, message):
    got, headers, answer = fetch(server + path, method, body, content_type)
    page = answer.decode("utf-8")
    assert got == status, page[:500]
    assert "text/html" in headers["Content-Type"]
    error = error_message(page)
    assert message in error, error
    assert not re.search(r"upload\.(csv|jsonl?)|demo-(batch|form)-", error), error  # no temporary path in it
    assert_no_traceback(page)
    assert_security_headers(headers)
    ok, headers, answer = fetch(server + "/health")  # the next request is answered as ever
    assert ok == 200 and json.loads(answer)["status"] == "ok"
    assert_security_headers(headers)


def busy_port():
    """A port another server listens on, for the test's duration."""
    sock = socket.create_server(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


@pytest.mark.parametrize("args,message", [
    pytest.param(("--port", "{busy}"), "demo: port {busy} on 127.0.0.1 is in use", id="port-in-use"),
    pytest.param(("--port", "70000"), "demo: --port 70000: a port is 1-65535", id="port-out-of-range"),
    pytest.param(("--host", "192.0.2.1", "--port", "{busy}"), "demo: port {busy} on 192.0.2.1 cannot be had",
                 id="host-not-here"),
])
def test_a_port_that_cannot_be_had_is_one_line_before_anything(checkpoint, tmp_path, args, message):
    with busy_port()[0] as holder:
        busy = str(holder.getsockname()[1])
        r = run_app("demo", "--checkpoint", str(checkpoint), *(a.replace("{busy}", busy) for a in args),
                    cwd=tmp_path, timeout=120)
        assert r.returncode == 2, r.stdout + r.stderr
        assert r.stderr.startswith(f"error: {message.replace('{busy}', busy)}") and r.stderr.count("\n") == 1, r.stderr
        assert "http://" not in r.stderr and r.stdout == ""  # no URL printed as if serving
    assert list(tmp_path.iterdir()) == []


# --- a real browser ---------------------------------------------------------------------------------------------------
def find_browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    """Headless Chromium driven through the DevTools protocol on fds 3/4 (--remote-debugging-pipe)."""

    def __init__(self, exe: str, profile: Path):
        to_child_r, self.to_child = os.pipe()
        self.from_child, from_child_w = os.pipe()

        def fds():
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "--window-size=1000,900", "--no-first-run", "about:blank"],
            close_fds=False, preexec_fn=fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # close_fds=False: with pass_fds the cleanup after preexec_fn would close the new fds 3/4
        os.close(to_child_r)
        os.close(from_child_w)
        self.buf, self.next_id, self.session = b"", 0, None
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]

    def call(self, method: str, timeout: float = 60, **params) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self.to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self.buf:
                raw, self.buf = self.buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
            if time.monotonic() > deadline:
                raise TimeoutError(method)
            chunk = os.read(self.from_child, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the pipe")
            self.buf += chunk

    def js(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return res.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(expression)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self.to_child)
        os.close(self.from_child)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    exe = find_browser()
    if exe is None:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium); the browser test needs one")
    b = Chromium(exe, tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


def submit_form(browser, url: str, values: dict[str, str]) -> None:
    """Open the page, type the values into the fields of those ids and press the submit button."""
    browser.call("Page.navigate", url=url + "/")
    browser.wait_for("document.readyState === 'complete' && !!document.getElementById('submit')")
    browser.js("".join(f"document.getElementById({json.dumps(k)}).value = {json.dumps(v)};" for k, v in values.items())
               + "document.getElementById('submit').click(); true")


def test_browser_submits_a_pair_and_reads_the_label(server, browser):
    submit_form(browser, server, {"premise": PAIR[0], "hypothesis": PAIR[1]})
    label = browser.wait_for("document.getElementById('label') && document.getElementById('label').textContent")
    assert label in ("0", "1")
    assert browser.js("document.getElementById('premise').value") == PAIR[0]
    assert browser.js("!!document.getElementById('reasoning')")
    browser.screenshot(ARTIFACTS / "demo_pair.png")
    assert (ARTIFACTS / "demo_pair.png").stat().st_size > 1000


def test_browser_applies_the_page_style_and_refuses_injected_script(server, browser):
    browser.call("Page.navigate", url=server + "/")
    browser.wait_for("document.readyState === 'complete' && !!document.getElementById('submit')")
    assert browser.js("getComputedStyle(document.body).maxWidth") == "736px"  # 46rem: the style passed the policy
    injected = ("var s = document.createElement('script'); s.textContent = 'window.injected = 1';"
                "document.body.appendChild(s); window.injected === undefined")
    assert browser.js(injected) is True  # an inline script is refused by the Content-Security-Policy


def test_browser_shows_a_message_for_a_blank_field(server, browser):
    submit_form(browser, server, {"premise": "The lamp is in the kitchen.", "hypothesis": "   "})
    error = browser.wait_for("document.getElementById('error') && document.getElementById('error').textContent")
    assert "hypothesis is empty" in error
    browser.screenshot(ARTIFACTS / "demo_error.png")


# --- confidence checkpoints -----------------------------------------------------------------------------------------
QUESTION = ("The lamp is in the kitchen.", "is the lamp indoors")


def tiny_task_checkpoint(config: str, model_dir: Path, out: Path, **overrides) -> Path:
    """checkpoints/final of a 2-step full fine-tune of the tiny model on a task's sample data (a few seconds)."""
    from app.config import load_config
    from app.train import train

    base = {"model_name": str(model_dir), "create_tiny_model": False, "out_dir": str(out), "max_steps": 2,
            "batch_size": 8, "micro_batch_size": 8, "eval_every": 1000, "save_every": 1000, "tensorboard": False,
            **overrides}
    args = [f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}" for k, v in base.items()]
    assert train(load_config(ROOT / "configs" / config, args)) == 0
    return out / "checkpoints" / "final"


@pytest.fixture(scope="module")
def ct_checkpoint(tiny_model_dir, tmp_path_factory) -> Path:
    return tiny_task_checkpoint("confidence_tokens_tiny.py", tiny_model_dir, tmp_path_factory.mktemp("ct") / "run",
                                validation_files={})


@pytest.fixture(scope="module")
def ch_checkpoint(tiny_model_dir, tmp_path_factory) -> Path:
    return tiny_task_checkpoint("confidence_head_tiny.py", tiny_model_dir, tmp_path_factory.mktemp("ch") / "run",
                                dev_file=None)


@pytest.fixture(scope="module")
def ct_server(ct_checkpoint, tmp_path_factory):
    yield from demo_server(ct_checkpoint, tmp_path_factory.mktemp("ctlog"))


@pytest.fixture(scope="module")
def ch_server(ch_checkpoint, tmp_path_factory):
    yield from demo_server(ch_checkpoint, tmp_path_factory.mktemp("chlog"))


def infer(checkpoint: Path, src: Path, out: Path) -> Path:
    """`python -m app infer` (in this process) on `src` with the demo's settings; the main output."""
    from app.__main__ import main

    assert main(["infer", str(src), "--checkpoint", str(checkpoint), "--output", str(out),
                 f"--max_new_tokens={MAX_NEW_TOKENS}"]) == 0
    return out


def data_value(page: str, ident: str) -> float:
    return float(page.split(f'id="{ident}" data-value="', 1)[1].split('"', 1)[0])


def submit(base: str, **fields):
    return post(base + "/predict", urllib.parse.urlencode(fields).encode(), "application/x-www-form-urlencoded")


def test_confidence_tokens_page_confidence_equals_infer(ct_server, ct_checkpoint, tmp_path):
    status, _, body = submit(ct_server, passage=QUESTION[0], question=QUESTION[1])
    page = body.decode()
    assert status == 200, page
    assert 'id="label">' in page and 'id="reasoning"' in page and 'id="token"' in page
    shown = data_value(page, "confidence")
    assert 0.0 <= shown <= 1.0 and f"{shown * 100:.1f}%" in page  # the percentage and its bar

    src = tmp_path / "one.jsonl"
    src.write_text(json.dumps({"passage": QUESTION[0], "question": QUESTION[1]}) + "\n")
    row = next(csv.DictReader(infer(ct_checkpoint, src, tmp_path / "predictions.csv").open()))
    assert float(row["confidence"]) == shown
    label = page.split('id="label">', 1)[1].split("<", 1)[0]
    assert (row["answer"] or "(no answer parsed)") == label


def test_confidence_tokens_batch_is_the_infer_file(ct_server, ct_checkpoint, tmp_path):
    src = tmp_path / "questions.csv"
    src.write_text("id,passage,question,answer\na,The cup is in the garden.,is the cup indoors,no\n"
                   "b,The pen is in the office.,is the pen indoors,yes\n")
    status, ctype, body = multipart(ct_server, src.read_bytes(), "questions.csv")
    assert status == 200 and "text/csv" in ctype, body[:500]
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert [r["id"] for r in rows] == ["a", "b"] and all(0 <= float(r["confidence"]) <= 1 for r in rows)
    assert body.decode() == infer(ct_checkpoint, src, tmp_path / "predictions.csv").read_text()


@pytest.mark.parametrize("fields,message", [
    ({"passage": "The lamp is in the kitchen.", "question": "  "}, "question is empty"),
    ({"question": "Where is the lamp?", "options": "indoors"}, "give at least two"),
    ({"question": "x" * 1_000_000}, "question is too long"),
])
def test_confidence_tokens_bad_input_is_a_message(ct_server, fields, message):
    status, ctype, body = submit(ct_server, **fields)
    page = body.decode()
    assert status == 400 and "text/html" in ctype and 'id="error"' in page and message in page
    assert_no_traceback(page)
    status, _, body = multipart(ct_server, b"premise,hypothesis\na,b\n")
    assert status == 400 and "missing column(s) question" in body.decode()


def test_confidence_head_page_scores_equal_infer(ch_server, ch_checkpoint, tmp_path):
    steps = ["Hugo is painting in the garage.", "So he is indoors."]
    status, _, body = submit(ch_server, problem="Where is Hugo painting?", steps="\n".join(steps))
    page = body.decode()
    assert status == 200, page
    shown = [data_value(page, f"confidence-{k}") for k in (1, 2)]
    src = tmp_path / "steps.jsonl"
    src.write_text(json.dumps({"problem": "Where is Hugo painting?", "steps": steps}) + "\n")
    out = infer(ch_checkpoint, src, tmp_path / "step_scores.jsonl")
    assert json.loads(out.read_text())["scores"] == shown
    status, ctype, body = multipart(ch_server, src.read_bytes(), "steps.jsonl")
    assert status == 200 and "ndjson" in ctype and body.decode() == out.read_text()


def test_browser_reads_answer_and_confidence(ct_server, browser):
    submit_form(browser, ct_server, {"passage": QUESTION[0], "question": QUESTION[1]})
    label = browser.wait_for("document.getElementById('label') && document.getElementById('label').textContent")
    assert label
    value = float(browser.js("document.getElementById('confidence').dataset.value"))
    assert 0.0 <= value <= 1.0
    assert browser.js("document.getElementById('confidence-percent').textContent") == f"{value * 100:.1f}%"
    bar = browser.js("document.querySelector('.bar > rect').getBoundingClientRect().width / "
                     "document.querySelector('.bar').getBoundingClientRect().width")
    assert abs(bar - value) < 0.02  # the bar is drawn to the confidence
    browser.screenshot(ARTIFACTS / "demo_confidence.png")
    assert (ARTIFACTS / "demo_confidence.png").stat().st_size > 1000


def test_a_task_without_a_page_is_refused():
    from app.demo.views import view_for
    from app.errors import UserError

    with pytest.raises(UserError, match="supports nli_cot, confidence_tokens, confidence_head"):
        view_for("ranking", "ckpt")
