"""A lean HTTP/1.1 keep-alive transport for the openai client's plain-http endpoints (vLLM, `transformers serve`,
the scripted test server): AsyncOpenAI still builds every request, adds the auth header and maps statuses and
errors; only the bytes on the wire go through this module instead of httpcore.

Why: against a local server the event loop is the limit. httpcore spends ~0.8 ms of CPU per request in its pool
and stream layers and suspends the request several times on the way out (headers and body in separate writes, each
behind an anyio checkpoint), so at 32 requests in flight every request waits behind the others' steps. Here a
request is one write and one suspension (until its whole reply is in), and a connection is an asyncio Protocol
that parses the reply as it arrives.

Scope: http:// only, no proxy (a configured HTTP proxy, and https, go through httpx's own transport). Replies are
read whole (the chat API is used without streaming): Content-Length, chunked, or until the connection closes.
Errors are httpx2's, so the openai client reports them as usual: ConnectError / ConnectTimeout, ReadTimeout,
WriteError and RemoteProtocolError (a connection closed without a reply, or a reply that is not HTTP/1.x).
"""

from __future__ import annotations

import asyncio
import urllib.request

import httpx2

MAX_HEAD = 64 * 1024  # a reply head larger than this is not a chat API's


def usable(base_url: str) -> bool:
    """Whether requests to base_url can take this transport: plain http and no proxy that applies to it."""
    url = httpx2.URL(base_url)
    if url.scheme != "http" or not url.host:
        return False
    proxies = urllib.request.getproxies()
    if not (proxies.get("http") or proxies.get("all")):
        return True
    return bool(urllib.request.proxy_bypass(url.host))


class _Body(httpx2.AsyncByteStream):
    def __init__(self, data: bytes):
        self.data = data

    async def __aiter__(self):
        yield self.data


class _Connection(asyncio.Protocol):
    """One keep-alive connection; `exchange` sends one request and returns its parsed reply."""

    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.head: tuple | None = None  # (status, reason, headers, body length or -1 chunked or None to close)
        self.body_start = 0
        self.closed = False
        self.received = False  # any reply byte for the current request
        self.head_only = False  # a HEAD request: the reply has no body

    # --- asyncio.Protocol
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buf += data
        self.received = True
        if self.waiter is not None and not self.waiter.done():
            try:
                reply = self._complete()
            except httpx2.RemoteProtocolError as err:
                self.waiter.set_exception(err)
                return
            if reply is not None:
                self.waiter.set_result(reply)

    def connection_lost(self, exc):
        self.closed = True
        w = self.waiter
        if w is None or w.done():
            return
        if self.head is not None and self.head[3] is None:  # body delimited by the close
            w.set_result(self._reply(bytes(self.buf[self.body_start:]), keep=False))
        elif self.received:
            w.set_exception(httpx2.RemoteProtocolError("the server closed the connection in the middle of its reply"))
        else:
            w.set_exception(httpx2.RemoteProtocolError("server disconnected without sending a response"))

    # --- one exchange
    async def exchange(self, data: bytes, read_timeout: float | None, head_only: bool):
        loop = asyncio.get_running_loop()
        self.buf.clear()
        self.head, self.received, self.head_only = None, False, head_only
        self.waiter = waiter = loop.create_future()
        # a timer on the loop rather than asyncio.wait_for: no task or callbacks per request
        timer = None if read_timeout is None else loop.call_later(read_timeout, self._timed_out, read_timeout)
        self.transport.write(data)
        try:
            return await waiter
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()

    def _timed_out(self, seconds: float):
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(httpx2.ReadTimeout(f"no reply within {seconds:g} s"))
            self.close()  # a late reply must not be read as the next request's

    def close(self):
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # --- parsing
    def _complete(self):
        """The reply once all of it is in the buffer; None while more is to come."""
        while self.head is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    raise httpx2.RemoteProtocolError("reply head too large")
                return None
            head = _parse_head(bytes(self.buf[:end]), self.head_only)
            if 100 <= head[0] < 200:  # an interim reply (100 Continue): the real one follows
                del self.buf[:end + 4]
                continue
            self.head, self.body_start = head, end + 4
        length = self.head[3]
        if length is None:
            return None  # until the connection closes
        if length >= 0:
            if len(self.buf) - self.body_start < length:
                return None
            return self._reply(bytes(self.buf[self.body_start:self.body_start + length]), keep=self.head[4])
        body = _dechunk(self.buf, self.body_start)
        return None if body is None else self._reply(body, keep=self.head[4])

    def _reply(self, body: bytes, keep: bool):
        status, reason, headers = self.head[:3]
        return status, reason, headers, body, keep


def _parse_head(head: bytes, head_only: bool) -> tuple:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise httpx2.RemoteProtocolError(f"not an HTTP/1.x reply: {lines[0][:80]!r}")
    status, reason = int(parts[1]), parts[2] if len(parts) > 2 else b""
    headers, length, chunked, close = [], None, False, parts[0] == b"HTTP/1.0"
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise httpx2.RemoteProtocolError("malformed reply header")
        name, value = name.strip(), value.strip()
        headers.append((name, value))
        lower = name.lower()
        if lower == b"content-length":
            if not value.isdigit():
                raise httpx2.RemoteProtocolError("malformed Content-Length")
            length = int(value)
        elif lower == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif lower == b"connection":
            v = value.lower()
            close = b"close" in v or (close and b"keep-alive" not in v)
    if head_only or status in (204, 304):
        length = 0
    elif chunked:
        length = -1
    elif length is None:
        close = True  # delimited by the close
    return status, reason, headers, length, not close


def _dechunk(buf: bytearray, pos: int) -> bytes | None:
    """The body of a complete chunked reply starting at buf[pos]; None while incomplete."""
    out = bytearray()
    while True:
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return None
        size_text = bytes(buf[pos:end]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise httpx2.RemoteProtocolError("malformed chunk size") from None
        pos = end + 2
        if size == 0:
            trailer_end = buf.find(b"\r\n\r\n", pos - 2)
            return bytes(out) if trailer_end >= 0 else None
        if len(buf) < pos + size + 2:
            return None
        out += buf[pos:pos + size]
        pos += size + 2


class LeanTransport(httpx2.AsyncBaseTransport):
    """Keep-alive connections to one http:// origin, at most `max_idle` kept open between requests."""

    def __init__(self, max_idle: int = 32):
        self.max_idle = max_idle
        self.idle: dict[tuple[str, int], list[_Connection]] = {}

    async def _connect(self, host: str, port: int, timeout: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(_Connection, host, port), timeout)
        except asyncio.TimeoutError:
            raise httpx2.ConnectTimeout(f"no connection to {host}:{port} within {timeout:g} s") from None
        except OSError as err:
            raise httpx2.ConnectError(str(err) or type(err).__name__) from None
        return conn

    def _take(self, origin) -> _Connection | None:
        pool = self.idle.get(origin)
        while pool:
            conn = pool.pop()  # most recently used first: the least likely to have been closed by the server
            if not conn.closed:
                return conn
        return None

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        url = request.url
        if url.scheme != "http":
            raise httpx2.UnsupportedProtocol(f"the lean transport speaks http only, not {url.scheme}")
        origin = (url.host, url.port or 80)
        timeout = request.extensions.get("timeout") or {}
        body = await request.aread()
        conn = self._take(origin) or await self._connect(*origin, timeout.get("connect"))
        try:
            status, reason, headers, data, keep = await conn.exchange(
                _serialize(request, body), timeout.get("read"), request.method == "HEAD")
        except BaseException:
            conn.close()
            raise
        if keep and not conn.closed and len(self.idle.setdefault(origin, [])) < self.max_idle:
            self.idle[origin].append(conn)
        else:
            conn.close()
        return httpx2.Response(status, headers=headers, stream=_Body(data),
                               extensions={"http_version": b"HTTP/1.1", "reason_phrase": reason})

    async def aclose(self) -> None:
        for pool in self.idle.values():
            for conn in pool:
                conn.close()
        self.idle.clear()


def _serialize(request: httpx2.Request, body: bytes) -> bytes:
    """The request head and body as one buffer: one write, one segment for a small request."""
    target = request.url.raw_path or b"/"
    lines = [request.method.encode("ascii") + b" " + target + b" HTTP/1.1"]
    has_length = False
    for name, value in request.headers.raw:
        lower = name.lower()
        if lower == b"transfer-encoding":  # the body is read whole: sent with its length instead
            continue
        if lower == b"content-length":
            has_length = True
        lines.append(name + b": " + value)
    if not has_length and (body or request.method not in ("GET", "HEAD")):
        lines.append(b"Content-Length: " + str(len(body)).encode("ascii"))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
