"""`python -m app demo --checkpoint DIR`: a small web page for a checkpoint (FastAPI + uvicorn, plain HTML).

The checkpoint's task (its run_config.json) picks the page (app/demo/views.py): nli_cot (premise + hypothesis ->
reasoning and label), confidence_tokens (passage + question -> answer, response and confidence), confidence_head
(problem + steps -> each step's confidence). Predictions are the task's own predictor's, the one `infer` runs.

  GET  /            the page: the task's form and a file upload
  POST /predict     the form (urlencoded): the page again with the result
  GET  /predict     the same with the fields as query parameters (a shareable link)
  POST /batch       a CSV or JSONL file (multipart, field `file`) in the task's `infer` input format: the task's
                    predictions file back, as `infer` writes it (nli_cot and confidence_tokens: predictions.csv;
                    confidence_head: step_scores.jsonl)
  GET  /health      {"status": "ok", "checkpoint": ..., "task": ...} once the model is loaded (the compose healthcheck)

The port is bound before anything else (a port in use is one line, exit 2, before the model loads); then the model
loads once (the checkpoint's run_config.json with `--key=value` overrides, as `infer`) and the server serves on that
socket. Bad input is a message in the page (HTTP 400; 413 for a body over MAX_UPLOAD_BYTES; 404/405 for another
path or method), never a traceback: an empty field, a field over MAX_FIELD_CHARS, a file without the columns or with
more than MAX_BATCH_ROWS rows, a checkpoint of another task at start. Every response carries SECURITY_HEADERS: a
Content-Security-Policy that allows the page's own stylesheet (by its hash), its forms posting to this server and
nothing else (no script, no frame, no other origin). Needs fastapi and uvicorn (default dependencies); multipart
bodies are parsed with the standard library, no python-multipart.
"""

import base64
import contextlib
import errno
import hashlib
import html
import json
import re
import socket
import sys
import tempfile
import threading
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from urllib.parse import parse_qs

from app.demo.views import Field, View, view_for
from app.errors import UserError

MAX_FIELD_CHARS = 20_000
MAX_UPLOAD_BYTES = 5_000_000
MAX_BATCH_ROWS = 2_000
PAGE = Path(__file__).with_name("page.html")
TEMPLATE = PAGE.read_text(encoding="utf-8")


def style_hash(template: str) -> str:
    """The CSP source of the page's one inline <style> element: the sha256 of its text, as the browser hashes it."""
    css = re.search(r"<style>(.*?)</style>", template, re.S).group(1)
    return "'sha256-" + base64.b64encode(hashlib.sha256(css.encode("utf-8")).digest()).decode("ascii") + "'"


# The page runs no script and loads nothing: its one style element (by hash), its forms posting here, no framing.
CONTENT_SECURITY_POLICY = (f"default-src 'none'; style-src {style_hash(TEMPLATE)}; form-action 'self'; "
                           "frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


class BodyTooLarge(UserError):
    """A request body over MAX_UPLOAD_BYTES: HTTP 413."""


class Demo:
    """The loaded checkpoint, its task's predictor and view (one request at a time on the model)."""

    def __init__(self, checkpoint: str | None, overrides=()):
        from app.runs import checkpoint_config, device, ensure_base_model, resolve_checkpoint, verify
        from app.tasks import get_task

        self.checkpoint, _ = resolve_checkpoint(checkpoint)
        self.cfg = checkpoint_config(self.checkpoint, list(overrides))
        self.view = view_for(self.cfg.task, str(self.checkpoint))
        verify(self.checkpoint)
        self.device = device()
        self.predictor = get_task(self.cfg.task).predictor(self.cfg)
        ensure_base_model(self.cfg, self.checkpoint)
        self.state = self.predictor.load(self.checkpoint, self.cfg, self.device)
        self.lock = threading.Lock()

    def _records(self, data) -> list[dict]:
        with self.lock:
            records = [r for batch in self.predictor.predict(self.state, self.cfg, data, self.device, None)
                       for r in batch]
        return sorted(records, key=lambda r: r["i"])

    def predict_row(self, row: dict) -> dict:
        """The predictor's record of one form row, read as `infer` reads a one-row JSONL file."""
        with tempfile.TemporaryDirectory(prefix="demo-form-") as tmp:
            src = Path(tmp) / "form.jsonl"
            src.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
            with user_paths(src, "the form"):
                data = self.predictor.read_input(src, self.cfg)
            return self._records(data)[0]

    def predict_file(self, content: bytes, suffix: str) -> tuple[bytes, str]:
        """(the task's predictions file, its name) of an uploaded file (a UserError names what is wrong with it)."""
        with tempfile.TemporaryDirectory(prefix="demo-batch-") as tmp:
            src = Path(tmp) / f"upload{suffix}"
            src.write_bytes(content)
            with user_paths(src, "the file"):
                data = self.predictor.read_input(src, self.cfg)
            if len(data) > MAX_BATCH_ROWS:
                raise UserError(f"{len(data)} rows; the demo predicts at most {MAX_BATCH_ROWS} (use python -m app "
                                "infer for more)")
            records = self._records(data)
            paths = self.predictor.output_paths(Path(tmp) / self.predictor.default_output)
            with contextlib.redirect_stdout(sys.stderr):  # finish() prints its summary for a terminal
                self.predictor.finish(data, records, paths, {}, 0)
            return paths.main.read_bytes(), paths.main.name


@contextlib.contextmanager
def user_paths(path: Path, name: str):
    """A UserError about the temporary file `path` names `name` instead: the path means nothing to the user."""
    try:
        yield
    except UserError as err:
        raise UserError(str(err).replace(str(path), name)) from None


def check_field(field: Field, value) -> str:
    """The field's text, stripped ("" for an empty optional field); a UserError saying what is wrong."""
    text = value if isinstance(value, str) else ""
    if len(text) > MAX_FIELD_CHARS:
        raise UserError(f"{field.name} is too long ({len(text):,} characters; at most {MAX_FIELD_CHARS:,})")
    if field.required and not text.strip():
        raise UserError(f"{field.name} is empty: type a {field.name}")
    return text.strip()


def parse_multipart_file(content_type: str, body: bytes, field: str = "file") -> tuple[bytes, str]:
    """(the bytes, the file name) of the uploaded file `field` of a multipart/form-data body."""
    if "multipart/form-data" not in (content_type or ""):
        raise UserError("upload a file with the form (multipart/form-data)")
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    for part in msg.iter_parts() if msg.is_multipart() else []:
        if part.get_param("name", header="content-disposition") == field:
            data = part.get_payload(decode=True) or b""
            if not data.strip():
                raise UserError("the uploaded file is empty")
            return data, part.get_filename() or ""
    raise UserError("no file uploaded: choose a file to predict")


def upload_suffix(filename: str, view: View) -> str:
    """The uploaded file's format: its name's extension when the readers know it, else the task's usual one."""
    suffix = Path(filename).suffix.lower()
    return suffix if suffix in (".csv", ".jsonl", ".json") else view.upload_suffix


def fields_html(view: View, values: dict[str, str]) -> str:
    out = []
    for f in view.fields:
        value = values.get(f.name, "")
        value = html.escape(value) if len(value) <= MAX_FIELD_CHARS else ""  # a rejected huge field is not echoed
        required = " required" if f.required else ""
        out.append(f'  <label for="{f.name}">{html.escape(f.label)}</label>\n'
                   f'  <textarea id="{f.name}" name="{f.name}"{required}>{value}</textarea>\n')
    return "".join(out)


def render_page(view: View, record: dict | None = None, error: str | None = None, values: dict | None = None,
                checkpoint: str = "") -> str:
    values = values or {}
    block = ""
    if error:
        block = f'<div id="error" class="error" role="alert">{html.escape(error)}</div>'
    elif record is not None:
        block = f'<div id="result" class="result">{view.render(record, values)}</div>'
    parts = {"title": html.escape(view.title), "about": view.about, "checkpoint": html.escape(checkpoint),
             "task": view.task, "fields": fields_html(view, values), "block": block, "max_chars": str(MAX_FIELD_CHARS),
             "upload_label": view.upload_label, "upload_note": view.upload_note}
    # one pass over the template: text a user typed that looks like a placeholder stays text
    return re.sub(r"\{\{(\w+)\}\}", lambda m: parts[m.group(1)], TEMPLATE)


def with_security_headers(app):
    """The ASGI app `app` with SECURITY_HEADERS on every response it sends, the error pages of its outermost
    middleware included (a handler of Exception answers from there, outside any FastAPI middleware)."""
    extra = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in SECURITY_HEADERS.items()]

    async def secured(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)

        async def send_secured(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        return await app(scope, receive, send_secured)

    return secured


def make_app(demo):  # annotations stay real objects here: FastAPI reads them
    """The ASGI application over a loaded `Demo` (or anything with its members, in tests): the FastAPI routes with
    SECURITY_HEADERS on every response."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    view = demo.view
    app = FastAPI(title=f"finetune-runner demo ({view.task})", docs_url=None, redoc_url=None, openapi_url=None)
    ckpt = str(demo.checkpoint)

    def page(status=200, **kw):
        return HTMLResponse(render_page(view, checkpoint=ckpt, **kw), status_code=status)

    async def read_body(request: Request) -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_UPLOAD_BYTES:
                raise BodyTooLarge(f"the request is too large (over {MAX_UPLOAD_BYTES // 1_000_000} MB)")
        return bytes(body)

    def answer(given: dict[str, str]):
        values = {f.name: given.get(f.name, "") for f in view.fields}
        try:
            checked = {f.name: check_field(f, values[f.name]) for f in view.fields}
            record = demo.predict_row(view.row(checked))
        except UserError as err:
            return page(400, error=str(err), values=values)
        return page(record=record, values=checked)

    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, err):
        return page(400, error="the request does not fit this page's forms; use the form above")

    @app.exception_handler(HTTPException)
    async def http_error(request, err):
        return page(err.status_code, error=f"{err.status_code}: {err.detail}")

    @app.exception_handler(Exception)
    async def any_error(request, err):  # never a traceback in the page
        print(f"demo: {type(err).__name__}: {err}", file=sys.stderr)
        return page(500, error="something went wrong on the server while answering; see the server log")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page()

    @app.get("/health")
    async def health():
        return JSONResponse({"status": "ok", "checkpoint": ckpt, "task": view.task})

    @app.get("/predict", response_class=HTMLResponse)
    async def predict_get(request: Request):
        return answer(dict(request.query_params))

    @app.post("/predict", response_class=HTMLResponse)
    async def predict_post(request: Request):
        try:
            body = await read_body(request)
        except BodyTooLarge as err:
            return page(413, error=str(err))
        try:
            form = parse_qs(body.decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError:
            return page(400, error="the form is not UTF-8 text")
        return answer({k: v[0] for k, v in form.items()})

    @app.post("/batch")
    async def batch(request: Request):
        try:
            body = await read_body(request)
            content, filename = parse_multipart_file(request.headers.get("content-type", ""), body)
            out, name = demo.predict_file(content, upload_suffix(filename, view))
        except UserError as err:
            return page(413 if isinstance(err, BodyTooLarge) else 400, error=str(err))
        return Response(out, media_type=view.media_type,
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    return with_security_headers(app)


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening (the server listens once the model is loaded); a
    UserError naming the port and host when it cannot be had."""
    if not 0 <= port <= 65535:
        raise UserError(f"demo: --port {port}: a port is 1-65535 (0: any free port)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        raise UserError(f"demo: --host {host}: not an address of this machine ({err.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        why = {errno.EADDRINUSE: "is in use (by another server: stop it, or choose another with --port)",
               errno.EACCES: "is not allowed (ports below 1024 need root: choose another with --port)",
               errno.EADDRNOTAVAIL: "cannot be had: the host is not an address of this machine (--host)"}
        raise UserError(f"demo: port {port} on {host} {why.get(err.errno, f'cannot be bound ({err.strerror})')}"
                        ) from None
    return sock


def serve(checkpoint: str | None, host: str, port: int, overrides=()) -> int:
    import importlib.util

    for package in ("fastapi", "uvicorn"):
        if importlib.util.find_spec(package) is None:
            from app.packages import missing

            raise missing(package, "the demo")
    import uvicorn

    sock = bind(host, port)  # before the model loads: a port in use is known at once
    with sock:
        demo = Demo(checkpoint, overrides)
        shown = f"[{host}]" if ":" in host else host
        print(f"demo of {demo.checkpoint} on http://{shown}:{sock.getsockname()[1]}/", file=sys.stderr, flush=True)
        uvicorn.Server(uvicorn.Config(make_app(demo), log_level="warning")).run(sockets=[sock])
    return 0
