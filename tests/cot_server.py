"""A scripted, fault-injecting OpenAI-compatible chat-completions server on 127.0.0.1 (tests and benchmarks of
`python -m app cot`). It runs an asyncio loop in a background thread and records every request it receives.

Answers: the label is `decide(premise, hypothesis)` (default: 1 when the hypothesis says "indoors" and the premise
names an indoor place) for a first-pass prompt, the given <label> for a reflection prompt, `consistency(...)` for a
consistency prompt, fixed scores for a judge prompt. Faults are scripted per premise: `server.faults[premise] = [
action, ...]` pops one action per request for that premise:
  {"status": 429, "headers": {"Retry-After": "1"}}   an error status (any), optional headers
  {"sleep": 3}                                      wait before answering normally (a client timeout)
  {"content": "...", "finish_reason": "length"}     this reply content / finish reason instead of the answer
  {"malformed": True}                               200 with a body that is not JSON
  {"body": "...", "content_type": "text/html"}      200 with this body (and content type) instead of a completion
  {"drop": True}                                    close the connection without an answer
`server.always = action` answers every request that has no scripted fault with that action (a server that answers
every row wrongly); None (the default): the answer.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

INDOOR = ("museum", "bedroom", "kitchen", "library", "office", "cafe")
_TAG = {name: re.compile(f"<{name}>(.*?)</{name}>", re.S) for name in ("premise", "hypothesis", "label", "reasoning")}
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 408: "Request Timeout",
           409: "Conflict", 429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
           503: "Service Unavailable"}


def default_decide(premise: str, hypothesis: str) -> int:
    indoor = any(w in premise.lower() for w in INDOOR)
    return int(("indoors" in hypothesis.lower()) == indoor)


class ScriptedServer:
    def __init__(self, latency: float = 0.0, decide=default_decide, api_key: str | None = None):
        self.latency, self.decide, self.api_key = latency, decide, api_key
        self.consistency = None  # (premise, hypothesis, reasoning) -> label; None: the label the reasoning names
        self.faults: dict[str, list[dict]] = {}
        self.always: dict | None = None
        self.refuse_response_format = False
        self.requests: list[dict] = []  # {"premise", "kind", "status", "response_format", "t"}
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.server = None
        self.port = None
        self.thread = threading.Thread(target=self._serve, daemon=True)

    # --- lifecycle
    def __enter__(self):
        ready = threading.Event()
        self._ready = ready
        self.thread.start()
        ready.wait(10)
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.loop.is_running():
            try:  # connections still open end here, not as "Task was destroyed but it is pending!" at exit
                asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(5)
            except Exception:  # noqa: BLE001 - stopping goes on regardless
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)

    async def _stop(self):
        self.server.close()
        handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in handlers:
            t.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _serve(self):
        asyncio.set_event_loop(self.loop)

        async def start():
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=512)
            self.port = self.server.sockets[0].getsockname()[1]
            self._ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    # --- counting
    def count(self, kind: str | None = None, premise: str | None = None, status: int | None = None) -> int:
        with self.lock:
            return sum(1 for r in self.requests if (kind is None or r["kind"] == kind)
                       and (premise is None or r["premise"] == premise) and (status is None or r["status"] == status))

    def premises(self, kind: str | None = None, status: int | None = 200) -> list[str]:
        with self.lock:
            return [r["premise"] for r in self.requests if (kind is None or r["kind"] == kind)
                    and (status is None or r["status"] == status)]

    # --- HTTP
    async def _handle(self, reader, writer):
        try:
            while True:
                try:  # the whole head in one read: a readline per header costs more than the rest of a request
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    break
                line, *lines = head.decode("latin-1").split("\r\n")
                headers = {}
                for h in lines:
                    if h:
                        k, _, v = h.partition(":")
                        headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", 0) or 0))
                keep = await self._respond(line, headers, body, writer)
                if not keep:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass

    def _send(self, writer, status: int, body: bytes, headers: dict | None = None,
              content_type: str = "application/json"):
        head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}", f"Content-Type: {content_type}",
                f"Content-Length: {len(body)}", "Connection: keep-alive"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)

    async def _respond(self, request_line: str, headers: dict, raw: bytes, writer) -> bool:
        if request_line.startswith("GET /stats"):
            with self.lock:
                counts = {"requests": len(self.requests), "answered": sum(r["status"] == 200 for r in self.requests)}
            self._send(writer, 200, json.dumps(counts).encode())
            return True
        try:
            req = json.loads(raw or b"{}")
        except ValueError:
            req = {}
        messages = req.get("messages") or []
        kind, fields = _classify(messages)
        premise = fields.get("premise", "")
        record = {"premise": premise, "kind": kind, "status": 200, "response_format": "response_format" in req,
                  "t": time.monotonic(), "model": req.get("model")}
        with self.lock:
            self.requests.append(record)
            queue = self.faults.get(premise)
            action = queue.pop(0) if queue else (self.always or {})
        if self.latency:
            await asyncio.sleep(self.latency)
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            record["status"] = 401
            self._send(writer, 401, json.dumps({"error": {"message": "Unauthorized"}}).encode())
            return True
        if self.refuse_response_format and "response_format" in req:
            record["status"] = 400
            self._send(writer, 400, json.dumps({"error": {"message": "response_format is not supported"}}).encode())
            return True
        if action.get("sleep"):
            await asyncio.sleep(action["sleep"])
        if action.get("drop"):
            record["status"] = -1
            return False
        if action.get("status"):
            record["status"] = action["status"]
            self._send(writer, action["status"], json.dumps({"error": {"message": "scripted"}}).encode(),
                       action.get("headers"))
            return True
        if action.get("malformed"):
            record["status"] = -2
            self._send(writer, 200, b"<html>upstream proxy error</html>")
            return True
        if "body" in action:
            record["status"] = -3
            self._send(writer, 200, action["body"].encode(), content_type=action.get("content_type", "application/json"))
            return True
        content = action.get("content")
        if content is None:
            content = json.dumps(self._answer(kind, fields))
        prompt_tokens = sum(len(str(m.get("content", ""))) for m in messages) // 4
        body = {"id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()),
                "model": req.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": action.get("finish_reason", "stop")}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(content) // 4,
                          "total_tokens": prompt_tokens + len(content) // 4}}
        self._send(writer, 200, json.dumps(body).encode())
        await writer.drain()
        return True

    def _answer(self, kind: str, f: dict) -> dict:
        if kind == "judge":
            return {"coherence": 5, "correctness": 4, "brevity": 3}
        if kind == "consistency":
            if self.consistency is not None:
                return {"predicted_label": self.consistency(f.get("premise"), f.get("hypothesis"), f.get("reasoning"))}
            m = re.search(r"label (\d)", f.get("reasoning", ""))
            return {"predicted_label": int(m.group(1)) if m else 1}
        if kind == "reflect":
            label = int(f.get("label", "1")[0])
            return {"thought_process": f"Step 1: {f['premise']} Step 2: {f['hypothesis']} Step 3: so label {label}.",
                    "predicted_label": label}
        label = self.decide(f.get("premise", ""), f.get("hypothesis", ""))
        return {"thought_process": f"Step 1: premise read. Step 2: hypothesis read. Step 3: so label {label}.",
                "predicted_label": label}


def _classify(messages: list[dict]) -> tuple[str, dict]:
    system = str(messages[0].get("content", "")) if messages else ""
    user = next((str(m.get("content", "")) for m in reversed(messages) if m.get("role") == "user"
                 and "<premise>" in str(m.get("content", ""))), "")
    fields = {}
    for name, rx in _TAG.items():
        m = rx.findall(user)
        if m:
            fields[name] = m[-1]
    if "Grade the reasoning" in system:
        kind = "judge"
    elif "Which label does the reasoning reach" in system:
        kind = "consistency"
    elif "<flawed_reasoning>" in user:
        kind = "reflect"
    else:
        kind = "generate"
    if messages and messages[-1].get("role") == "user" and "<premise>" not in str(messages[-1].get("content", "")):
        kind += "-repair"
    return kind, fields


def stats(base_url: str) -> dict:
    """The request counts of a server running in another process (GET /stats)."""
    import urllib.request

    with urllib.request.urlopen(base_url.rsplit("/v1", 1)[0] + "/stats", timeout=10) as r:
        return json.loads(r.read())


if __name__ == "__main__":  # a server in its own process: prints its base URL, serves until killed
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.0)
    a = ap.parse_args()
    with ScriptedServer(latency=a.latency) as srv:
        print(srv.base_url, flush=True)
        srv.thread.join()
