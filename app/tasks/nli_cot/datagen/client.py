"""The API client: AsyncOpenAI against any OpenAI-compatible base_url, with the cache in front of it.

- bounded concurrency: at most `concurrency` requests in flight (rows are worked on by twice as many workers, so
  that parsing and caching one reply overlaps the next request)
- requests-per-minute (evenly spaced starts) and tokens-per-minute (60 s sliding window of prompt estimate +
  max_tokens) limits
- retries with capped exponential backoff and jitter on 408/409/429/5xx, timeouts, dropped connections and reply
  bodies that are not a chat completion; a `Retry-After` (or `retry-after-ms`) header is honoured and pauses every
  request, since the limit it reports is the account's, not one request's
- structured output (`response_format` JSON schema) when on, or in auto mode until the server refuses it (400/422)
- fatal, one line: a refused API key (naming the environment variable), a refused connection before any reply,
  an unknown model

The API key is read from the environment variable named in the config and handed to the client only; it is never
logged, written or part of an error message.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from app.errors import UserError
from app.tasks.nli_cot.datagen.cache import ResponseCache, request_key

RETRY_STATUS = {408, 409, 429}


class RequestFailed(Exception):
    """A request that could not be answered (retries spent, or a 4xx about this request): the row fails."""


@dataclass
class Reply:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached: bool


@dataclass
class Counters:
    requests: int = 0  # HTTP requests sent
    answered: int = 0  # of them, replies stored in the cache
    cache_hits: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0  # of the requests sent now
    first_sent: float | None = None  # monotonic time of the first request sent
    last_reply: float | None = None  # and of the last reply stored
    errors: dict = field(default_factory=dict)


def api_key(cfg) -> str:
    import os

    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise UserError(f"environment variable {cfg.api_key_env} is not set: it must hold the API key for "
                        f"{cfg.base_url} (api_key_env names another variable)")
    return key


def reply_from_body(body: dict, cached: bool) -> Reply:
    """A Reply from a chat-completion body; ValueError when the body is not one."""
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError("no choices in the reply body")
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise ValueError("no message in the reply body")
    content = message.get("content")
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    return Reply(content if isinstance(content, str) else "", choices[0].get("finish_reason"),
                 int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), cached)


def retry_after(headers) -> float | None:
    """Seconds from a Retry-After (seconds or HTTP date) or retry-after-ms header."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(float(ms) / 1000, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        try:
            return max(email.utils.parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None


class Limiter:
    """RPM: starts spaced 60/rpm s apart. TPM: a 60 s window of estimated tokens. Pauses from Retry-After."""

    def __init__(self, rpm: int | None, tpm: int | None):
        self.rpm, self.tpm = rpm, tpm
        self.next_start = 0.0
        self.window: deque[tuple[float, int]] = deque()
        self.window_tokens = 0
        self.paused_until = 0.0
        self.lock = asyncio.Lock()

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)

    async def acquire(self, tokens: int) -> None:
        async with self.lock:
            while True:
                now = time.monotonic()
                wait = self.paused_until - now
                if self.rpm:
                    wait = max(wait, self.next_start - now)
                if self.tpm:
                    while self.window and self.window[0][0] <= now - 60:
                        self.window_tokens -= self.window.popleft()[1]
                    if self.window and self.window_tokens + tokens > self.tpm:
                        wait = max(wait, self.window[0][0] + 60 - now)
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            if self.rpm:
                self.next_start = max(now, self.next_start) + 60.0 / self.rpm
            if self.tpm:
                self.window.append((now, tokens))
                self.window_tokens += tokens


class ChatClient:
    def __init__(self, cfg, cache: ResponseCache, key: str):
        import openai

        self.cfg, self.cache = cfg, cache
        self.openai = openai
        self.client = openai.AsyncOpenAI(
            api_key=key, base_url=cfg.base_url, max_retries=0,
            timeout=openai.Timeout(cfg.request_timeout, connect=cfg.connect_timeout))
        self.limiter = Limiter(cfg.rpm, cfg.tpm)
        self.slots = asyncio.Semaphore(cfg.concurrency)  # requests in flight (not held while parsing or backing off)
        self.counters = Counters()
        self.structured = cfg.structured_output != "off"
        self.connected = False
        self.rng = random.Random()

    def params(self) -> dict:
        p = {"temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens}
        if self.cfg.seed is not None:
            p["seed"] = self.cfg.seed
        return p

    def key(self, model: str, messages: list[dict], schema: dict | None) -> str:
        """The cache key of a request with `schema` as its response_format (None: without one)."""
        params = self.params() if schema is None else {**self.params(), "response_format": schema}
        return request_key(model, messages, params, self.cfg.prompt_version)

    def cached(self, model: str, messages: list[dict], schema: dict | None) -> Reply | None:
        mode = self.cfg.structured_output if schema is not None else "off"
        for structured in {"on": (True,), "off": (False,), "auto": (True, False)}[mode]:
            body = self.cache.get(self.key(model, messages, schema if structured else None))
            if body is not None:
                try:
                    reply = reply_from_body(body, cached=True)
                except ValueError:
                    continue
                self.counters.cache_hits += 1
                return reply
        return None

    def backoff(self, attempt: int) -> float:
        cap = min(self.cfg.backoff_max, self.cfg.backoff_base * 2 ** attempt)
        return cap * (0.5 + 0.5 * self.rng.random())  # jitter: between half and all of the capped delay

    async def complete(self, model: str, messages: list[dict], schema: dict | None = None) -> Reply:
        hit = self.cached(model, messages, schema)
        if hit is not None:
            return hit
        o = self.openai
        estimate = sum(len(str(m.get("content", ""))) for m in messages) // 4 + self.cfg.max_tokens
        attempt = 0
        while True:
            delay = use_schema = None
            try:
                async with self.slots:
                    await self.limiter.acquire(estimate)
                    use_schema = schema if (self.structured and schema is not None) else None  # as of now
                    request = {"model": model, "messages": messages, **self.params()}
                    if use_schema:
                        request["response_format"] = {"type": "json_schema", "json_schema": use_schema}
                    self.counters.requests += 1
                    if self.counters.first_sent is None:
                        self.counters.first_sent = time.monotonic()
                    # the client's own POST (auth, base URL, timeouts, errors as APIStatusError), with the reply body
                    # as text: the body is plain JSON already, and chat.completions.create would spend ~5 ms of CPU
                    # per request transforming it, which caps a single process well below 160 requests/s
                    text = await self.client.post("/chat/completions", cast_to=str, body=request)
                self.connected = True
                try:
                    body = json.loads(text)
                except (ValueError, RecursionError):
                    raise _BadBody("not JSON") from None
                try:
                    reply = reply_from_body(body, cached=False)
                except ValueError as err:
                    raise _BadBody(str(err)) from None
                self.cache.put(self.key(model, messages, use_schema), model, body)
                c = self.counters
                c.answered += 1
                c.last_reply = time.monotonic()
                c.prompt_tokens += reply.prompt_tokens
                c.completion_tokens += reply.completion_tokens
                pin, pout = self.cfg.price(model)
                c.cost += (reply.prompt_tokens * pin + reply.completion_tokens * pout) / 1e6
                return reply
            except o.APIStatusError as err:
                self.connected = True
                status = err.status_code
                reason = f"HTTP {status}"
                if status in (401, 403):
                    raise UserError(f"{self.cfg.base_url}: HTTP {status}, the API key in environment variable "
                                    f"{self.cfg.api_key_env} was refused") from None
                if status == 404:
                    raise UserError(f"{self.cfg.base_url}: HTTP 404 for model {model!r} (unknown model, or base_url "
                                    "is not the .../v1 root of an OpenAI-compatible API)") from None
                if use_schema is not None and self.cfg.structured_output == "auto" and status in (400, 422):
                    if self.structured:
                        self.structured = False
                        print(f"note: {self.cfg.base_url} refused response_format (HTTP {status}); asking for JSON "
                              "in the prompt only", file=sys.stderr)
                    continue
                if status not in RETRY_STATUS and status < 500:
                    raise RequestFailed(f"HTTP {status}: {_message(err)}") from None
                delay = retry_after(err.response.headers if err.response is not None else None)
                if delay is not None:
                    delay = min(delay, self.cfg.backoff_max)
                    self.limiter.pause(delay)
            except o.APITimeoutError:
                reason = f"timed out after {self.cfg.request_timeout:g} s"
            except o.APIConnectionError as err:
                if not self.connected:
                    raise UserError(f"{self.cfg.base_url}: cannot connect ({_cause(err)}); is the server up and "
                                    "base_url right?") from None
                reason = f"connection error ({_cause(err)})"
            except _BadBody as err:
                reason = f"malformed reply body ({err})"
            self.counters.errors[reason.split(" (")[0]] = self.counters.errors.get(reason.split(" (")[0], 0) + 1
            if attempt >= self.cfg.max_retries:
                raise RequestFailed(f"{reason}; gave up after {attempt + 1} attempts")
            if delay is None:
                delay = self.backoff(attempt)
            attempt += 1
            self.counters.retries += 1
            await asyncio.sleep(delay)

    async def close(self) -> None:
        await self.client.close()


class _BadBody(Exception):
    pass


def _message(err) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        msg = inner.get("message") if isinstance(inner, dict) else inner
        if msg:
            return " ".join(str(msg).split())[:200]
    return " ".join(str(getattr(err, "message", err)).split())[:200]


def _cause(err) -> str:
    cause = err.__cause__ or err.__context__
    text = " ".join(str(cause or err).split())
    return text[:160] or type(cause or err).__name__
