"""The API client: AsyncOpenAI against any OpenAI-compatible base_url, with the cache in front of it.

- bounded concurrency: at most `concurrency` requests in flight (rows are worked on by twice as many workers, so
  that parsing and caching one reply overlaps the next request); one client and one httpx connection pool for the
  run, sized to the concurrency
- identical requests in flight are sent once: a row whose cache key is being asked already awaits that answer
- requests-per-minute (evenly spaced starts) and tokens-per-minute (60 s sliding window) limits: a request reserves
  its estimate (prompt characters / 4 + max_tokens) before it is sent, and the reply's reported usage replaces the
  estimate once it arrives (an error status frees the reservation; a timeout keeps it, the server may have worked)
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
import dataclasses
import email.utils
import json
import random
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from app.errors import UserError
from app.tasks.nli_cot.datagen.cache import ResponseCache, request_key, request_keys

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
    total_tokens: int = 0  # the usage's total_tokens (prompt + completion where the server leaves it out)


@dataclass
class Counters:
    requests: int = 0  # HTTP requests sent
    answered: int = 0  # of them, replies stored in the cache
    cache_hits: int = 0  # rows answered without a request: from the cache, or by an identical request in flight
    shared: int = 0  # rows that awaited an identical request in flight (its answer is a cache hit, its failure theirs)
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0  # of the requests sent now
    first_sent: float | None = None  # monotonic time of the first request sent
    last_reply: float | None = None  # and of the last reply stored
    errors: dict = field(default_factory=dict)


def import_openai():
    """The openai package (and httpx2, the HTTP client it is built on); a one-line UserError naming the `pip install`
    to run when the environment lacks it or holds a broken copy."""
    try:
        import httpx2  # noqa: F401 - the client's connection pool (http_client)
        import openai
    except ImportError as err:
        from app.packages import missing

        package = (err.name or "openai").split(".")[0]
        raise missing(package, "cot (data generation through an OpenAI-compatible API)") from None
    return openai


def endpoint(cfg) -> str:
    """The URL every request of the run is sent to."""
    return cfg.base_url.rstrip("/") + "/chat/completions"


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
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    return Reply(content if isinstance(content, str) else "", choices[0].get("finish_reason"), prompt, completion,
                 cached, int(usage.get("total_tokens") or prompt + completion))


def estimate_tokens(messages: list[dict], max_tokens: int) -> int:
    """What a request may use before its reply says: ~4 characters a prompt token, and the whole completion budget."""
    return sum(len(str(m.get("content", ""))) for m in messages) // 4 + max_tokens


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


class Reservation:
    """Tokens a request holds in the TPM window: its estimate until the reply reports what it used."""

    __slots__ = ("t", "tokens", "live")

    def __init__(self, t: float, tokens: int):
        self.t, self.tokens = t, tokens
        self.live = True  # still counted in the window


class Limiter:
    """RPM: starts spaced 60/rpm s apart. TPM: a 60 s window of reserved tokens. Pauses from Retry-After."""

    def __init__(self, rpm: int | None, tpm: int | None):
        self.rpm, self.tpm = rpm, tpm
        self.next_start = 0.0
        self.window: deque[Reservation] = deque()
        self.window_tokens = 0
        self.paused_until = 0.0
        self.lock = asyncio.Lock()
        self.freed: asyncio.Event | None = None  # set when a reply frees tokens: a waiting start looks again

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)

    async def acquire(self, tokens: int) -> Reservation | None:
        """Wait until a request of `tokens` (estimated) may start; its reservation in the TPM window, if any."""
        if not (self.rpm or self.tpm) and self.paused_until <= time.monotonic():
            return None  # nothing to wait for: no lock, no suspension
        async with self.lock:
            while True:
                now = time.monotonic()
                wait = self.paused_until - now
                if self.rpm:
                    wait = max(wait, self.next_start - now)
                if self.tpm:
                    self._expire(now)
                    if self.window and self.window_tokens + tokens > self.tpm:
                        wait = max(wait, self.window[0].t + 60 - now)
                if wait <= 0:
                    break
                await self._sleep(wait)
            if self.rpm:
                self.next_start = max(now, self.next_start) + 60.0 / self.rpm
            if not self.tpm:
                return None
            r = Reservation(now, tokens)
            self.window.append(r)
            self.window_tokens += tokens
            return r

    def settle(self, r: Reservation | None, tokens: int) -> None:
        """Replace a reservation's estimate by what the request used (0: nothing, e.g. an error status)."""
        if r is None or tokens == r.tokens:
            return
        if r.live:
            self.window_tokens += tokens - r.tokens
        freed = tokens < r.tokens
        r.tokens = tokens
        if freed and self.freed is not None:
            self.freed.set()

    def _expire(self, now: float) -> None:
        while self.window and self.window[0].t <= now - 60:
            r = self.window.popleft()
            r.live = False
            self.window_tokens -= r.tokens

    async def _sleep(self, seconds: float) -> None:
        """Sleep up to `seconds`; sooner when a reply frees tokens (only a TPM wait can end early that way)."""
        if not self.tpm:
            await asyncio.sleep(seconds)
            return
        if self.freed is None:
            self.freed = asyncio.Event()
        self.freed.clear()
        try:
            await asyncio.wait_for(self.freed.wait(), seconds)
        except asyncio.TimeoutError:
            pass


class ChatClient:
    def __init__(self, cfg, cache: ResponseCache, key: str):
        openai = import_openai()
        import httpx2

        self.cfg, self.cache = cfg, cache
        self.openai = openai
        self.client = openai.AsyncOpenAI(
            api_key=key, base_url=cfg.base_url, max_retries=0, http_client=http_client(cfg),
            timeout=openai.Timeout(cfg.request_timeout, connect=cfg.connect_timeout))
        self.limiter = Limiter(cfg.rpm, cfg.tpm)
        self.slots = asyncio.Semaphore(cfg.concurrency)  # requests in flight (not held while parsing or backing off)
        self.counters = Counters()
        self.structured = cfg.structured_output != "off"
        self.connected = False
        self.rng = random.Random()
        self.inflight: dict[str, asyncio.Future] = {}  # cache key -> the answer of the request asking it now
        self._params = self.params()
        self._raw = httpx2.Response  # cast_to: the reply as it came, no response wrapper or text decoding

    def params(self) -> dict:
        p = {"temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens}
        if self.cfg.seed is not None:
            p["seed"] = self.cfg.seed
        return p

    def key(self, model: str, messages: list[dict], schema: dict | None) -> str:
        """The cache key of a request with `schema` as its response_format (None: without one)."""
        params = self._params if schema is None else {**self._params, "response_format": schema}
        return request_key(model, messages, params, self.cfg.prompt_version)

    def keys(self, model: str, messages: list[dict], schema: dict | None) -> dict[bool, str]:
        """The cache keys a request may be answered under: structured (True) and prompt-only (False), as the
        structured_output mode allows; each hashed once per request."""
        mode = self.cfg.structured_output if schema is not None else "off"
        kinds = {"on": (True,), "off": (False,), "auto": (True, False)}[mode]
        variants = [{**self._params, "response_format": schema} if s else self._params for s in kinds]
        return dict(zip(kinds, request_keys(model, messages, variants, self.cfg.prompt_version)))

    def cached(self, keys: dict[bool, str]) -> Reply | None:
        for k in keys.values():
            body = self.cache.get(k)
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
        keys = self.keys(model, messages, schema)
        hit = self.cached(keys)
        if hit is not None:
            return hit
        ident = next(iter(keys.values()))  # the request as asked, whichever key its answer is stored under
        pending = self.inflight.get(ident)
        if pending is not None:
            return await self._share(pending)
        future = asyncio.get_running_loop().create_future()
        self.inflight[ident] = future
        try:
            reply = await self._request(model, messages, schema, keys)
        except BaseException as err:
            if isinstance(err, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(err)
                future.exception()  # retrieved: no "never retrieved" warning when no identical row waits
            raise
        finally:
            del self.inflight[ident]
        future.set_result(reply)
        return reply

    async def _share(self, pending: asyncio.Future) -> Reply:
        """The answer of an identical request in flight (its failure too), as a cache hit: no request of our own.
        Shielded: a waiter cancelled does not cancel the request it waits on."""
        self.counters.shared += 1
        reply = await asyncio.shield(pending)
        self.counters.cache_hits += 1
        return dataclasses.replace(reply, cached=True)

    async def _request(self, model: str, messages: list[dict], schema: dict | None, keys: dict[bool, str]) -> Reply:
        o = self.openai
        estimate = estimate_tokens(messages, self.cfg.max_tokens)
        attempt = 0
        while True:
            delay = use_schema = reservation = None
            try:
                async with self.slots:
                    reservation = await self.limiter.acquire(estimate)
                    use_schema = schema if (self.structured and schema is not None) else None  # as of now
                    request = {"model": model, "messages": messages, **self._params}
                    if use_schema:
                        request["response_format"] = {"type": "json_schema", "json_schema": use_schema}
                    self.counters.requests += 1
                    if self.counters.first_sent is None:
                        self.counters.first_sent = time.monotonic()
                    # the client's own POST (auth, base URL, timeouts, errors as APIStatusError) with the raw reply:
                    # the body is plain JSON already, and chat.completions.create would spend ~5 ms of CPU per
                    # request building models of it, which caps a single process well below 160 requests/s
                    raw = await self.client.post("/chat/completions", cast_to=self._raw, body=request)
                self.connected = True
                # the slot just freed wakes a row waiting for it: let it send its request before this reply is
                # parsed and cached, so that a reply's bookkeeping never delays the next request
                await asyncio.sleep(0)
                return self._store(model, raw.content, keys[use_schema is not None], reservation)
            except o.APIStatusError as err:
                self.limiter.settle(reservation, 0)  # refused: nothing generated
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

    def _store(self, model: str, content: bytes, key: str, reservation: Reservation | None) -> Reply:
        """A reply body parsed, appended to the cache and counted; _BadBody when it is not a chat completion."""
        try:
            body = json.loads(content)
        except (ValueError, RecursionError):
            raise _BadBody("an HTML page, not JSON" if content.lstrip()[:1] == b"<" else "not JSON") from None
        try:
            reply = reply_from_body(body, cached=False)
        except ValueError as err:
            raise _BadBody(str(err)) from None
        if reply.total_tokens:  # what the request used, in place of its estimate
            self.limiter.settle(reservation, reply.total_tokens)
        self.cache.put(key, model, body)
        c = self.counters
        c.answered += 1
        c.last_reply = time.monotonic()
        c.prompt_tokens += reply.prompt_tokens
        c.completion_tokens += reply.completion_tokens
        pin, pout = self.cfg.price(model)
        c.cost += (reply.prompt_tokens * pin + reply.completion_tokens * pout) / 1e6
        return reply

    async def close(self) -> None:
        await self.client.close()


def http_client(cfg):
    """One connection pool for the run, sized to the concurrency (httpx's own default keeps fewer alive)."""
    import httpx2
    import openai

    return openai.DefaultAsyncHttpxClient(limits=httpx2.Limits(max_connections=cfg.concurrency,
                                                               max_keepalive_connections=cfg.concurrency))


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
