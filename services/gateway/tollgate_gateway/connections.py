"""Client connections: the gateway's own HTTP/1.1 server protocol, run by uvicorn's server.

uvicorn stays the server (sockets, signals, lifespan, workers, the drain in `main.py`);
this is the protocol class it runs on each connection (`uvicorn.Config(http=...)`), in
place of its httptools one, for what a front door needs that it lacks:

- Deadlines in every state. uvicorn arms a timer only for keep-alive waits after a
  response, so a connection that never sends a request, sends its headers a byte at a
  time (slowloris) or declares a body it never sends held a descriptor forever: 500 such
  connections, or 5,000 idle ones, pinned a gateway. Here headers must come within
  `header_timeout` of the connection (or of the next request's first byte), a body
  within `body_timeout` of its headers (the request then ends as a client disconnect,
  settled like any other), the next request within `idle_timeout`; one timer per
  connection, re-armed only when it fires early.
- Bounds: past `max_connections` a new connection gets one OpenAI-shaped 503 and is
  closed; a request head past `MAX_HEAD` is a 431 (uvicorn buffered any head until the
  header deadline: a client could send gigabytes of one header line).
- Less work per request: no `asyncio.Event`, flow-control object or regular expression
  per header (a response head is checked for line breaks in one pass over its bytes),
  and the client leaving is a callback (`asgi.ON_DISCONNECT`) rather than a task per
  request waiting on `receive`. 11 % less gateway CPU per non-stream request
  (docs/performance.md).

What it keeps of uvicorn's behaviour: HTTP/1.0 and `Connection: close`, pipelined
requests answered in order, `100 Continue` on the first read of the body, HEAD, chunked
responses when the application gives no length, back-pressure both ways, the `date`
header, a 500 (or a closed connection) when the application fails, and `shutdown()` for
the drain: idle connections close, busy ones close after their response. Every error it
answers itself has the OpenAI shape.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import httptools

from tollgate_gateway import errors
from tollgate_gateway.asgi import ON_DISCONNECT, WRITE, ASGIApp, Message, Scope
from tollgate_gateway.errors import Refusal, response_parts

log = logging.getLogger("tollgate.gateway")

# A request body buffered past this is not read further until the application takes it.
HIGH_WATER = 65536
# A request head (request line and headers) larger than this is refused (431).
MAX_HEAD = 65536
# llhttp buffers a header until its line ends, with no callback: the bytes read while a
# head is unfinished are counted too, against this looser bound (a read is at most 256
# KiB, so no head under MAX_HEAD can reach it, whatever else shares its reads).
MAX_UNFINISHED_HEAD = 1 << 20

_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = HTTPStatus(status).phrase.encode()
        except ValueError:
            phrase = b""
        line = _STATUS_LINES[status] = b"HTTP/1.1 %d %s\r\n" % (status, phrase)
    return line


def _last_answer(kind: errors.ErrorKind, message: str, retry_after: float | None = None) -> bytes:
    """A whole OpenAI-shaped error response that ends its connection."""
    status, headers, body = response_parts(Refusal(kind, message, retry_after))
    lines = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    return _status_line(status) + lines + b"connection: close\r\n\r\n" + body


_MALFORMED = _last_answer(errors.INVALID_REQUEST, "The request is not valid HTTP/1.1.")
_HEAD_TOO_LARGE = _last_answer(
    errors.HEAD_TOO_LARGE, f"The request line and headers exceed {MAX_HEAD} bytes."
)
_FAILED = _last_answer(errors.INTERNAL, "Internal gateway error.")


class _Request:
    """One request on a connection: what the application's `receive` and `send` act on."""

    __slots__ = (
        "body",
        "chunked",
        "complete",
        "conn",
        "continue_wanted",
        "disconnected",
        "handed_over",
        "head_only",
        "held",
        "keep_alive",
        "left",
        "more_body",
        "remaining",
        "scope",
        "started",
        "waiters",
    )

    def __init__(self, conn: ClientConnection, scope: Scope, keep_alive: bool, expect: bool):
        self.conn = conn
        self.scope = scope
        self.keep_alive = keep_alive
        self.continue_wanted = expect
        self.head_only = scope["method"] == "HEAD"
        self.body = b""
        self.more_body = True
        self.handed_over = False  # the whole body has gone to the application
        self.disconnected = False
        self.started = False
        self.complete = False
        self.chunked = False
        self.remaining = 0  # content-length bytes still to send
        self.held = b""  # a content-length head, written with the first body bytes
        self.waiters: list[asyncio.Future[None]] = []
        self.left: Callable[[], None] | None = None
        scope["extensions"] = {ON_DISCONNECT: self.on_disconnect, WRITE: self.write}

    def on_disconnect(self, callback: Callable[[], None] | None) -> None:
        self.left = callback
        if callback is not None and self.disconnected and not self.complete:
            callback()

    def wake(self) -> None:
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def receive(self) -> Message:
        conn = self.conn
        if self.continue_wanted:
            self.continue_wanted = False
            if self.more_body and not conn.transport.is_closing():
                conn.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if not self.handed_over:
            while not (self.body or not self.more_body or self.disconnected):
                conn.resume_reading()  # (paused for this body: no request follows it yet)
                await conn.wait(self.waiters)
            if not self.disconnected:
                body, self.body = self.body, b""
                self.handed_over = not self.more_body
                return {"type": "http.request", "body": body, "more_body": self.more_body}
        # The body was read: what is left to hear of is the client leaving.
        while not (self.disconnected or self.complete):
            await conn.wait(self.waiters)
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        conn = self.conn
        if conn.write_paused and not self.disconnected:
            await conn.wait(conn.drain_waiters)
        if self.disconnected:
            return
        if not self.started:
            if message["type"] != "http.response.start":
                raise RuntimeError(f"expected http.response.start, got {message['type']!r}")
            head = self._head(message["status"], message.get("headers", ()))
            self.started = True
            self.continue_wanted = False  # (after `_head`, which reads it)
            if self.remaining and not (self.chunked or self.head_only):
                self.held = head  # one write for a whole answer, not two
            else:
                conn.transport.write(head)
            return
        if self.complete or message["type"] != "http.response.body":
            raise RuntimeError(f"unexpected ASGI message {message['type']!r}")
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if self.head_only:
            pass
        elif self.chunked:
            if body and more:
                self.write(body)
            elif body:
                conn.transport.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body))
            elif not more:
                conn.transport.write(b"0\r\n\r\n")
        else:
            self.remaining -= len(body)
            if self.remaining < 0:
                raise RuntimeError("response body longer than its content-length")
            if self.held:
                body, self.held = self.held + body, b""
            if body:
                conn.transport.write(body)
        if not more:
            if self.remaining and not self.head_only:
                raise RuntimeError("response body shorter than its content-length")
            self.complete = True
            self.wake()
            conn.response_done(self)

    def write(self, body: bytes) -> bool:
        """`asgi.WRITE`: a piece of a chunked body, now; whether the client has room."""
        conn = self.conn
        if body and not self.disconnected:  # (an empty chunk would end the body)
            if not self.chunked or self.complete:
                raise RuntimeError("write() is for a chunked body under way")
            conn.transport.write(b"%x\r\n%b\r\n" % (len(body), body))
        return not conn.write_paused

    def _head(self, status: int, headers: Any) -> bytes:
        parts = [_status_line(status)]
        length = None
        chunked = close = False
        count = 0
        for name, value in (*self.conn.server_state.default_headers, *headers):
            name = name.lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = value.lower() == b"chunked"
            elif name == b"connection" and b"close" in value.lower():
                close = True
            parts += (name, b": ", value, b"\r\n")
            count += 1
        if self.continue_wanted and self.more_body:
            # An answer before the body the client is waiting to send: it will not send
            # it now (RFC 9110 10.1.1), so the connection ends rather than read it as
            # the next request.
            self.keep_alive = False
        if close:
            self.keep_alive = False
        elif not self.keep_alive:
            parts.append(b"connection: close\r\n")
            count += 1
        if length is not None:
            self.remaining = length
        elif not self.head_only and status not in (204, 304):
            chunked = True
            parts.append(b"transfer-encoding: chunked\r\n")
            count += 1
        self.chunked = chunked and not self.head_only
        parts.append(b"\r\n")
        head = b"".join(parts)
        # Each line ends in exactly one CRLF: a name or value carrying CR or LF would add
        # one, and with it a header (or a response) the application never wrote.
        if not head.count(b"\r") == head.count(b"\n") == count + 2:
            raise RuntimeError("a response header carries a line break")
        return head


class ClientConnection(asyncio.Protocol):
    """One client connection; the class itself is made by `client_protocol()`."""

    header_timeout: float
    body_timeout: float
    max_connections: int
    over_limit: bytes

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.app: ASGIApp = config.loaded_app
        self.idle_timeout: float = config.timeout_keep_alive
        self.loop = _loop or asyncio.get_event_loop()
        self.server_state = server_state
        self.app_state = app_state
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.client: tuple[str, int] | None = None
        self.server: tuple[str, int] | None = None
        self.write_paused = False
        self.drain_waiters: list[asyncio.Future[None]] = []
        self.read_paused = False
        self.active: _Request | None = None  # the request being answered
        self.parsing: _Request | None = None  # the request whose body is being read
        self.pipeline: deque[_Request] = deque()
        self.in_head = False  # between a request's first byte and its head's end
        self.head_size = 0  # the request line and the headers parsed so far
        self.head_read = 0  # bytes read since the head began (after its first read)
        self.too_large = False
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.expect = False
        self.deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they have its methods.
        self.transport = transport  # type: ignore[assignment]
        connections = self.server_state.connections
        connections.add(self)
        if len(connections) > self.max_connections:
            self.transport.write(self.over_limit)
            self.transport.close()
            return
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        self.client = (peer[0], peer[1]) if isinstance(peer, tuple) else None
        self.server = (local[0], local[1]) if isinstance(local, tuple) else None
        self._expire_in(self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)
        self.deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for request in (self.active, self.parsing, *self.pipeline):
            if request is not None and not request.disconnected:
                request.disconnected = True
                request.wake()
                if request.left is not None and not request.complete:
                    request.left()
        self.write_paused = False
        for waiter in self.drain_waiters:
            if not waiter.done():
                waiter.set_result(None)

    def eof_received(self) -> bool | None:
        return None  # close: a half-closed client has no more requests to send

    def data_received(self, data: bytes) -> None:
        try:
            if self.in_head:
                self.head_read += len(data)
                if self.head_read > MAX_UNFINISHED_HEAD:
                    self.too_large = True
                    raise httptools.HttpParserError("request head too large")
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No upgrades: the request is answered as plain HTTP, and the connection then
            # closed (what follows the head is not HTTP/1.1 any more).
            upgraded = self.pipeline[-1] if self.pipeline else self.active
            if upgraded is not None:
                upgraded.keep_alive = False
        except httptools.HttpParserError:
            self._refuse(_HEAD_TOO_LARGE if self.too_large else _MALFORMED)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for waiter in self.drain_waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self, waiters: list[asyncio.Future[None]]) -> None:
        """Until the next `wake` of `waiters` (one future per waiting task, so that one
        waiter's cancellation leaves the others waiting)."""
        waiter = self.loop.create_future()
        waiters.append(waiter)
        try:
            await waiter
        finally:
            waiters.remove(waiter)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.expect = False
        self.head_size = self.head_read = 0
        self.in_head = True
        self._expire_in(self.header_timeout)

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        name = name.lower()
        value = value.rstrip(b" \t")  # llhttp keeps trailing whitespace (RFC 9110 5.5)
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect = True
        self.headers.append((name, value))

    def _count_head(self, size: int) -> None:
        self.head_size += size
        if self.head_size > MAX_HEAD:
            self.too_large = True
            raise httptools.HttpParserError("request head too large")

    def on_headers_complete(self) -> None:
        self.in_head = False
        parser = self.parser
        version = parser.get_http_version()
        url = httptools.parse_url(self.url)
        raw_path = url.path
        path = raw_path.decode("ascii")
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": version,
            "server": self.server,
            "client": self.client,
            "scheme": "http",
            "method": parser.get_method().decode("ascii"),
            "root_path": "",
            "path": urllib.parse.unquote(path) if "%" in path else path,
            "raw_path": raw_path,
            "query_string": url.query or b"",
            "headers": self.headers,
        }
        if self.app_state:
            scope["state"] = self.app_state.copy()
        keep_alive = version != "1.0" and parser.should_keep_alive()
        request = self.parsing = _Request(self, scope, keep_alive, self.expect)
        self._expire_in(self.body_timeout)
        if self.active is None:
            self._start(request)
        else:  # pipelined: answered after the one before it
            self.pipeline.append(request)
            self.pause_reading()

    def on_body(self, body: bytes) -> None:
        request = self.parsing
        if request is None or request.complete:
            return  # already answered: the rest of its body is read and dropped
        request.body += body
        if len(request.body) > HIGH_WATER:
            self.pause_reading()
        request.wake()

    def on_message_complete(self) -> None:
        request, self.parsing = self.parsing, None
        if request is not None:
            request.more_body = False
            request.wake()
        self._between_requests()

    # Requests

    def _start(self, request: _Request) -> None:
        self.active = request
        task = self.loop.create_task(self._run(request))
        tasks = self.server_state.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _run(self, request: _Request) -> None:
        try:
            await self.app(request.scope, request.receive, request.send)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                log.error("the application failed", exc_info=exc)
            if (not request.started or request.held) and not request.disconnected:
                self.transport.write(_FAILED)  # nothing was written yet
            if not request.complete:
                self.transport.close()
            return
        finally:
            # The extension's bound method refers back to the request through its scope:
            # without this, every request would wait for the cycle collector.
            del request.scope["extensions"]
        if not request.complete and not request.disconnected:
            log.error("the application returned before its response ended")
            self.transport.close()

    def response_done(self, request: _Request) -> None:
        self.server_state.total_requests += 1
        if not request.keep_alive:
            self.transport.close()
            return
        if self.transport.is_closing():
            return
        self.active = None
        self.resume_reading()
        if self.pipeline:
            self._start(self.pipeline.popleft())
        self._between_requests()

    def _between_requests(self) -> None:
        """The deadline once no request is being read: none while one is answered, the
        idle timeout when none is."""
        if self.in_head or self.parsing is not None:
            return  # a request is being read: its own deadline applies
        if self.active is None:
            self._expire_in(self.idle_timeout)
        else:
            self.deadline = None

    def shutdown(self) -> None:
        """The server is draining: close now if idle, else after this response."""
        if self.active is None:
            self.transport.close()
            return
        for request in (self.active, *self.pipeline):
            request.keep_alive = False

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()

    def _refuse(self, answer: bytes) -> None:
        if self.active is None:  # a response in flight cannot be followed by another
            self.transport.write(answer)
        self.transport.close()

    # The connection's one timer: moved by setting `deadline`, fired only when it passes.

    def _expire_in(self, seconds: float) -> None:
        self.deadline = due = self.loop.time() + seconds
        if self._timer is None or due < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = due
            self._timer = self.loop.call_at(due, self._check_deadline)

    def _check_deadline(self) -> None:
        self._timer = None
        due = self.deadline
        if due is None:
            return
        if self.loop.time() >= due:
            if not self.transport.is_closing():
                self.transport.close()
            return
        self._timer_at = due
        self._timer = self.loop.call_at(due, self._check_deadline)


def client_protocol(
    header_timeout: float, body_timeout: float, max_connections: int
) -> type[ClientConnection]:
    """The protocol class for `uvicorn.Config(http=...)`, with these limits."""
    limits = {
        "header_timeout": header_timeout,
        "body_timeout": body_timeout,
        "max_connections": max_connections,
        "over_limit": _last_answer(
            errors.OVERLOADED, "The gateway is at its connection limit; retry shortly.", 1
        ),
    }
    return type("LimitedClientConnection", (ClientConnection,), limits)
