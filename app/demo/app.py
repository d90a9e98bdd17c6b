"""`python -m app demo --checkpoint DIR`: a small web page for an NLI checkpoint (FastAPI + uvicorn, plain HTML).

  GET  /            the page: a premise + hypothesis form and a CSV upload
  POST /predict     the form (urlencoded): the page again with the reasoning and the label
  GET  /predict     the same with ?premise=...&hypothesis=... (a shareable link)
  POST /batch       a CSV (multipart, field `file`) with premise and hypothesis columns: predictions.csv back
                    (index, id, predicted_label, thought_process, parse_ok: the `infer` output)
  GET  /health      {"status": "ok", "checkpoint": ...} once the model is loaded (the compose healthcheck)

The model loads once at start (the checkpoint's run_config.json with `--key=value` overrides, as `infer`). Bad input
is a message in the page (HTTP 400), never a traceback: an empty field, a field over MAX_FIELD_CHARS, a body over
MAX_UPLOAD_BYTES, a CSV without the columns or with more than MAX_BATCH_ROWS rows. Needs fastapi and uvicorn (the
`dev` and `demo` extras); multipart bodies are parsed with the standard library, no python-multipart.
"""

import html
import sys
import tempfile
import threading
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from urllib.parse import parse_qs

from app.errors import UserError

MAX_FIELD_CHARS = 20_000
MAX_UPLOAD_BYTES = 5_000_000
MAX_BATCH_ROWS = 2_000
PAGE = Path(__file__).with_name("page.html")


class Demo:
    """The loaded checkpoint and what the page asks of it (one request at a time on the model)."""

    def __init__(self, checkpoint: str | None, overrides=()):
        from app.runs import checkpoint_config, device, ensure_base_model, resolve_checkpoint, verify
        from app.tasks import get_task

        self.checkpoint, _ = resolve_checkpoint(checkpoint)
        self.cfg = checkpoint_config(self.checkpoint, list(overrides))
        if self.cfg.task != "nli_cot":
            raise UserError(f"{self.checkpoint}: trained for task={self.cfg.task!r}; the demo page needs an nli_cot "
                            "checkpoint")
        verify(self.checkpoint)
        self.device = device()
        self.predictor = get_task(self.cfg.task).predictor(self.cfg)
        ensure_base_model(self.cfg, self.checkpoint)
        self.state = self.predictor.load(self.checkpoint, self.cfg, self.device)
        self.lock = threading.Lock()

    def predict_pair(self, premise: str, hypothesis: str) -> dict:
        from app.tasks.nli_cot.predict import InputData

        data = InputData(Path("<form>"), [{"premise": premise, "hypothesis": hypothesis}], [1], None, None)
        with self.lock:
            records = [r for batch in self.predictor.predict(self.state, self.cfg, data, self.device, None)
                       for r in batch]
        return records[0]

    def predict_csv(self, content: bytes) -> bytes:
        """The predictions CSV of an uploaded CSV (a UserError names what is wrong with it)."""
        with tempfile.TemporaryDirectory(prefix="demo-batch-") as tmp:
            src = Path(tmp) / "input.csv"
            src.write_bytes(content)
            data = self.predictor.read_input(src, self.cfg)
            if len(data) > MAX_BATCH_ROWS:
                raise UserError(f"{len(data)} rows; the demo predicts at most {MAX_BATCH_ROWS} (use python -m app "
                                "infer for more)")
            with self.lock:
                records = [r for batch in self.predictor.predict(self.state, self.cfg, data, self.device, None)
                           for r in batch]
            records.sort(key=lambda r: r["i"])
            paths = self.predictor.output_paths(Path(tmp) / "predictions.csv")
            self.predictor.finish(data, records, paths, {}, 0)
            return paths.main.read_bytes()


def check_field(name: str, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{name} is empty: type a {name}")
    if len(value) > MAX_FIELD_CHARS:
        raise UserError(f"{name} is too long ({len(value):,} characters; at most {MAX_FIELD_CHARS:,})")
    return value.strip()


def parse_multipart_file(content_type: str, body: bytes, field: str = "file") -> bytes:
    """The bytes of the uploaded file `field` of a multipart/form-data body."""
    if "multipart/form-data" not in (content_type or ""):
        raise UserError("upload a CSV file with the form (multipart/form-data)")
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    for part in msg.iter_parts() if msg.is_multipart() else []:
        if part.get_param("name", header="content-disposition") == field:
            data = part.get_payload(decode=True) or b""
            if not data.strip():
                raise UserError("the uploaded file is empty")
            return data
    raise UserError("no file uploaded: choose a CSV file with premise and hypothesis columns")


def render_page(result: dict | None = None, error: str | None = None, premise: str = "", hypothesis: str = "",
                checkpoint: str = "") -> str:
    esc = html.escape
    block = ""
    if error:
        block = f'<div id="error" class="error" role="alert">{esc(error)}</div>'
    elif result is not None:
        label = int(result["label"])
        name = "entailment" if label == 1 else "no entailment"
        note = "" if result["parse_ok"] else '<p class="note">(the label came from the fallback: no JSON object)</p>'
        block = (f'<div id="result" class="result"><p>Label: <strong id="label">{label}</strong> '
                 f'(<span id="label-name">{name}</span>)</p><p>Reasoning:</p>'
                 f'<pre id="reasoning">{esc(result["thought"] or "(none)")}</pre>{note}</div>')
    # premise/hypothesis are echoed back only when short enough to be worth it
    keep = lambda s: esc(s) if len(s) <= MAX_FIELD_CHARS else ""  # noqa: E731
    return (PAGE.read_text(encoding="utf-8").replace("{{checkpoint}}", esc(checkpoint)).replace("{{block}}", block)
            .replace("{{premise}}", keep(premise)).replace("{{hypothesis}}", keep(hypothesis))
            .replace("{{max_chars}}", str(MAX_FIELD_CHARS)))


def make_app(demo):  # annotations stay real objects here: FastAPI reads them
    """The FastAPI application over a loaded `Demo` (or anything with its three members, in tests)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    app = FastAPI(title="finetune-runner NLI demo", docs_url=None, redoc_url=None, openapi_url=None)
    ckpt = str(demo.checkpoint)

    def page(status=200, **kw):
        return HTMLResponse(render_page(checkpoint=ckpt, **kw), status_code=status)

    async def read_body(request: Request) -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_UPLOAD_BYTES:
                raise UserError(f"the request is too large (over {MAX_UPLOAD_BYTES // 1_000_000} MB)")
        return bytes(body)

    def answer(premise, hypothesis):
        try:
            p, h = check_field("premise", premise), check_field("hypothesis", hypothesis)
        except UserError as err:
            return page(400, error=str(err), premise=premise or "", hypothesis=hypothesis or "")
        return page(result=demo.predict_pair(p, h), premise=p, hypothesis=h)

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
        return JSONResponse({"status": "ok", "checkpoint": ckpt})

    @app.get("/predict", response_class=HTMLResponse)
    async def predict_get(premise: str = "", hypothesis: str = ""):
        return answer(premise, hypothesis)

    @app.post("/predict", response_class=HTMLResponse)
    async def predict_post(request: Request):
        try:
            body = await read_body(request)
        except UserError as err:
            return page(413, error=str(err))
        try:
            form = parse_qs(body.decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError:
            return page(400, error="the form is not UTF-8 text")
        return answer(form.get("premise", [""])[0], form.get("hypothesis", [""])[0])

    @app.post("/batch")
    async def batch(request: Request):
        try:
            body = await read_body(request)
            content = parse_multipart_file(request.headers.get("content-type", ""), body)
            out = demo.predict_csv(content)
        except UserError as err:
            msg = str(err).replace(str(Path(tempfile.gettempdir())), "upload")
            if "input.csv" in msg:  # the temporary file's path means nothing to the user
                msg = "the CSV" + msg.split("input.csv", 1)[1]
            return page(400, error=msg)
        return Response(out, media_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="predictions.csv"'})

    return app


def serve(checkpoint: str | None, host: str, port: int, overrides=()) -> int:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"the demo needs {' and '.join(missing)}: pip install 'finetune-runner[demo]'")
    import uvicorn

    demo = Demo(checkpoint, overrides)
    print(f"demo of {demo.checkpoint} on http://{host}:{port}/", file=sys.stderr, flush=True)
    uvicorn.run(make_app(demo), host=host, port=port, log_level="warning")
    return 0
