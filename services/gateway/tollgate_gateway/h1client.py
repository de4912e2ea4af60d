"""A minimal keep-alive HTTP/1.1 client for the gateway's upstream calls.

Why not aiohttp: under load about 40-45 % of the gateway's busy CPU is aiohttp's client
(its request and response objects, header multidicts, URL handling, timer contexts and
stream readers), and the gateway uses almost none of that: it sends a body that is already
bytes, to a handful of fixed origins, and reads back a status, a content type and the body.
This client does only that, on an asyncio `Protocol` with httptools' llhttp parser (already a
dependency: uvicorn and the simulator parse with it).

- One `Pool` per upstream origin, of at most `limit` connections (open or opening). The
  N+1th request waits for a connection handed back, or for a free slot; the wait is the
  gateway's own queue, so it is not part of the connect timeout (TCP connect and the TLS
  handshake only).
- The request head is bytes built once per request (`Pool.head`); bodies are bytes with a
  content-length (never chunked uploads).
- Responses may be content-length, chunked (SSE) or close-delimited.
- A stream's body is handed to the caller's sink from the connection's own callback
  (`Response.pump`), as it is parsed: no task wakes, no future, no generator step per
  piece. The sink says when its reader is full; reading then pauses until it has room.
- Keep-alive: a connection goes back to the pool only when its response was read to its end
  and the server did not say `Connection: close`. Idle connections are used newest first and
  dropped after `keepalive` seconds (below the upstream's own keep-alive timeout). An idle
  connection the server closed is noticed by the loop (EOF) and leaves the pool; for the
  race where the server closes it just as a request is written, a request on a *reused*
  connection that the server closed before any response byte is sent once more on another
  connection: the server cannot have started on it.
- Timeouts: `read_timeout` bounds every wait for bytes (the first byte, then each gap); one
  timer per response, re-armed lazily, so a busy stream costs no timer work per chunk.
- Errors are this module's `H1Error` subclasses, so the caller maps them to its outcomes
  without knowing about sockets.

Not supported (the gateway needs none of it): HEAD requests (refused: the parser would wait for a
body), `Expect: 100-continue`, upgrades, request pipelining, proxies, compression.
"""

from __future__ import annotations

import asyncio
import collections
import ssl as _ssl
from collections.abc import Callable, Iterable, Mapping
from typing import cast
from urllib.parse import urlsplit

import httptools

# A stream's body buffered beyond this pauses reading from the socket, so a slow client
# pushes back on the upstream instead of growing the gateway's memory.
HIGH_WATER = 256 * 1024
# Bodies up to this are written with the head in one buffer (one send); larger ones as two.
_JOIN_BELOW = 64 * 1024


class H1Error(Exception):
    """Any failure of this client."""


class ConnectError(H1Error):
    """The connection could not be made: refused, unknown host, TLS handshake failed."""


class ConnectTimeout(H1Error, TimeoutError):
    """The TCP connect (and TLS handshake) took longer than the connect timeout."""


class ReadTimeout(H1Error, TimeoutError):
    """No byte arrived within the read timeout (the first byte, or a gap in the body)."""


class ServerDisconnected(H1Error):
    """The server closed (or reset) the connection before any byte of the response: it did
    not answer this request, so sending it again elsewhere is safe."""


class ProtocolError(H1Error):
    """The response was not valid HTTP/1.1, or ended inside its head."""


class BodyError(H1Error):
    """The response broke off after its head: the connection was lost mid-body, or the
    body was malformed (a bad chunk)."""


class _Conn(asyncio.Protocol):
    """One connection and the state of the one response in flight on it."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.alive = True  # open, and not given up on
        self.active = False  # a request is in flight
        self.reused = False  # has served a response before
        self.idle_since = 0.0
        self.waiter: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timeout: float | None = None
        self.last = 0.0  # when bytes last arrived (or a wait began)
        # The body's pieces. The parser calls `on_body` once per chunk (an SSE stream has
        # one per event): bound to the list's own append, that is no Python frame at all.
        # httptools looks its callbacks up once, so this list is never replaced, only
        # cleared.
        self.body: list[bytes] = []
        self.on_body = self.body.append
        self.parser = httptools.HttpResponseParser(self)
        self.sink: Callable[[bytes], bool] | None = None  # while `pump` runs
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_type = b""
        self.delimited = False  # content-length or transfer-encoding present
        self.got_bytes = False
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.streaming = False
        self.paused = False
        self.body.clear()
        self.buffered = 0  # bytes received since the reader last took the body
        self.exc: H1Error | None = None
        self.sink_error: Exception | None = None  # what the sink raised

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.active or self.complete:
            # Bytes nobody asked for: the connection's state is unknown, never reuse it.
            self.close()
            return
        self.got_bytes = True
        self.last = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            kind = BodyError if self.headers_done else ProtocolError
            self._fail(kind(f"malformed response: {exc}"))
            return
        if self.sink is not None:
            if self.body:
                self.hand(self.sink)
        elif self.streaming:
            self.buffered += len(data)
            if self.buffered > HIGH_WATER and not self.paused and not self.complete:
                self.pause()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self.active and not self.complete and self.exc is None:
            if not self.got_bytes:
                how = "reset" if exc is not None else "closed"
                self.exc = ServerDisconnected(f"the server {how} the connection before answering")
            elif not self.headers_done:
                self.exc = ProtocolError("the connection closed inside the response head")
            elif not self.delimited and self.status not in (204, 304):
                # A close-delimited body ends with the connection.
                self.complete = True
            else:
                self.exc = BodyError(f"the connection closed mid-body ({exc or 'EOF'})")
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.alive:
            self.alive = False
            self.pool._drop(self)

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        lowered = name.lower()
        if lowered == b"content-type":
            self.content_type = value
        elif lowered == b"content-length" or lowered == b"transfer-encoding":
            self.delimited = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if not 100 <= self.status < 200:
            self.headers_done = True

    def on_message_complete(self) -> None:
        if not self.headers_done:  # an interim 1xx answer: the real one follows
            self.headers = []
            self.content_type = b""
            self.delimited = False
            return
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # The exchange

    def hand(self, sink: Callable[[bytes], bool]) -> None:
        """The body received so far, to `sink`; reading pauses if it has no room."""
        body = self.body
        piece = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self.buffered = 0
        try:
            room = sink(piece)
        except Exception as exc:  # the caller's: raised again where it waits (`pump`)
            self.sink_error = exc
            return
        if not room and not self.complete:
            self.pause()

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
            self.paused = True

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            if self.alive and self.transport is not None:
                self.transport.resume_reading()

    def close(self) -> None:
        """Give up on the connection (idempotent); its pool slot is freed at once."""
        if self.alive:
            self.alive = False
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            if self.transport is not None:
                self.transport.close()
            self.pool._drop(self)

    def _fail(self, exc: H1Error) -> None:
        if self.exc is None:
            self.exc = exc
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self.close()

    async def _wait(self) -> None:
        waiter = self.waiter = self.loop.create_future()
        self.last = max(self.last, self.loop.time())
        try:
            await waiter
        finally:
            self.waiter = None

    def _on_timer(self) -> None:
        """The read timeout's one timer: it fires at `last + timeout` and re-arms itself
        while bytes keep coming, so data arriving costs only a clock read."""
        self.timer = None
        if self.complete or not self.alive or self.timeout is None:
            return
        now = self.loop.time()
        due = self.last + self.timeout
        if now < due:
            self.timer = self.loop.call_at(due, self._on_timer)
        elif self.waiter is None:  # the reader is busy (or full), not waiting on the server
            self.timer = self.loop.call_at(now + self.timeout, self._on_timer)
        else:
            self._fail(ReadTimeout(f"no data from the server in {self.timeout:g} s"))

    async def exchange(self, head: bytes, body: bytes, read_timeout: float | None) -> None:
        """Write the request; return once the response's head is read."""
        if not self.alive or self.transport is None or self.transport.is_closing():
            self.close()
            raise ServerDisconnected("the server closed the idle connection")
        self.active = True
        if body and len(body) < _JOIN_BELOW:
            self.transport.write(head + body)
        else:
            self.transport.write(head)
            if body:
                self.transport.write(body)
        self.timeout = read_timeout
        if read_timeout is not None:
            self.last = self.loop.time()
            self.timer = self.loop.call_at(self.last + read_timeout, self._on_timer)
        while not self.headers_done:
            if self.exc is not None:
                raise self.exc
            await self._wait()

    def finished(self) -> None:
        """The caller is done with the response: back to the pool if reusable."""
        if self.alive and self.complete and self.keep_alive and self.exc is None:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self.resume()
            self.active = False
            self.reused = True
            self._reset()
            self.pool._put(self)
        else:
            self.close()


class Response:
    """One response: status and headers read, the body still on the connection.

    `release()` (or `close()`) must be called once done; it is idempotent."""

    __slots__ = ("_conn", "_done", "content_type", "headers", "status")

    def __init__(self, conn: _Conn) -> None:
        self._conn = conn
        self._done = False
        self.status = conn.status
        self.headers = conn.headers  # raw (name, value) pairs, names as the server sent them
        self.content_type = conn.content_type.decode("latin-1")

    async def read(self) -> bytes:
        """The whole body. Cancelled or failed: the connection is closed."""
        conn = self._conn
        try:
            while not conn.complete:
                if conn.exc is not None:
                    raise conn.exc
                await conn._wait()
        except BaseException:
            conn.close()
            raise
        body = conn.body
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        conn.buffered = 0
        return data

    async def pump(self, sink: Callable[[bytes], bool]) -> bool:
        """Hand the body to `sink` as it arrives, from the connection's callback; True
        once it has ended. `sink` returns False when its reader is full: reading stops,
        and this returns False; call it again once there is room. Cancelled or failed:
        the connection is closed (the server sees the client go)."""
        conn = self._conn
        conn.streaming = True
        try:
            conn.resume()
            if conn.body:  # what came with the head, or while reading was paused
                conn.hand(sink)
            conn.sink = sink
            while True:
                if conn.exc is not None:
                    raise conn.exc
                if conn.sink_error is not None:
                    raise conn.sink_error
                if conn.complete:
                    return True
                if conn.paused:
                    return False
                await conn._wait()
        except BaseException:
            conn.close()
            raise
        finally:
            conn.sink = None

    def release(self) -> None:
        """Done: the connection is reused if the body was read to its end, else closed."""
        if not self._done:
            self._done = True
            self._conn.finished()

    def close(self) -> None:
        """Done, and the connection is closed whatever state it is in."""
        if not self._done:
            self._done = True
            self._conn.close()


class Pool:
    """The connections to one origin: at most `limit`, idle ones newest first."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl: _ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        limit: int = 100,
        keepalive: float = 4.0,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.host = host
        self.port = port
        self.ssl = ssl
        self.server_hostname = (server_hostname or host) if ssl is not None else None
        self.limit = limit
        self.keepalive = keepalive
        default = 443 if ssl is not None else 80
        shown = f"[{host}]" if ":" in host else host
        self.authority = shown if port == default else f"{shown}:{port}"
        self.count = 0  # connections open or being opened
        self.connects = 0  # connections ever opened (for tests and metrics)
        self._idle: list[_Conn] = []
        self._waiters: collections.deque[asyncio.Future[_Conn | None]] = collections.deque()

    def head(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str] | Iterable[tuple[str, str]],
        content_length: int | None,
    ) -> bytes:
        """The request head as bytes: request line, Host, the given headers (which must not
        hold Host, Content-Length or Transfer-Encoding), Content-Length when there is a body
        or the method usually has one."""
        if method == "HEAD":
            raise ValueError("HEAD is not supported (its answer's length says no body)")
        items = headers.items() if isinstance(headers, Mapping) else headers
        parts = [f"{name}: {value}\r\n" for name, value in items]
        block = "".join(parts)
        lines = len(parts)
        if block.count("\n") != lines or block.count("\r") != lines:
            raise ValueError("a header name or value holds CR or LF")
        length = "" if content_length is None else f"content-length: {content_length}\r\n"
        text = f"{method} {target} HTTP/1.1\r\nhost: {self.authority}\r\n{block}{length}\r\n"
        return text.encode("latin-1")

    async def request(
        self,
        head: bytes,
        body: bytes = b"",
        *,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
    ) -> Response:
        """Send a request (its head from `head`); the response once its head is read."""
        for retry in (False, True):
            conn = await self._acquire(connect_timeout)
            try:
                await conn.exchange(head, body, read_timeout)
            except ServerDisconnected:
                conn.close()
                # An idle connection the server closed as we wrote: it never saw the request.
                if conn.reused and not retry:
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            return Response(conn)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        """Close the idle connections; those in use close when released."""
        while self._idle:
            self._idle.pop().close()

    # Slots and connections

    async def _acquire(self, connect_timeout: float | None) -> _Conn:
        idle = self._idle
        if idle:
            now = self.loop.time()
            while idle:
                conn = idle.pop()
                if now - conn.idle_since < self.keepalive:
                    return conn
                conn.close()  # expired; the others are older still
                while idle:
                    idle.pop().close()
        if self.count < self.limit:
            self.count += 1
            return await self._open(connect_timeout)
        waiter: asyncio.Future[_Conn | None] = self.loop.create_future()
        self._waiters.append(waiter)
        try:
            got = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                handed = waiter.result()  # handed over just as we were cancelled
                if handed is None:
                    self._free_slot()
                else:
                    self._put(handed)
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise
        if got is None:  # a slot, not a connection: open one
            return await self._open(connect_timeout)
        return got

    async def _open(self, connect_timeout: float | None) -> _Conn:
        """A new connection in a slot already counted; the slot is freed on failure."""
        try:
            async with asyncio.timeout(connect_timeout):
                _, conn = await self.loop.create_connection(
                    lambda: _Conn(self),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.server_hostname,
                )
        except TimeoutError:
            self._free_slot()
            raise ConnectTimeout(
                f"connecting to {self.authority} took over {connect_timeout:g} s"
            ) from None
        except OSError as exc:  # refused, DNS (gaierror), TLS (SSLError)
            self._free_slot()
            raise ConnectError(f"cannot connect to {self.authority}: {exc}") from None
        except BaseException:
            self._free_slot()
            raise
        self.connects += 1
        return conn

    def _put(self, conn: _Conn) -> None:
        """A reusable connection: to the first waiter, else to the idle list."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)

    def _free_slot(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.count -= 1

    def _drop(self, conn: _Conn) -> None:
        """A connection is gone (closed by us or the server): free its slot."""
        if not conn.active and conn in self._idle:
            self._idle.remove(conn)
        self._free_slot()


class Client:
    """The pools of every upstream origin, by base URL (`http://host:port`)."""

    def __init__(
        self,
        *,
        limit: int = 100,
        keepalive: float = 4.0,
        ssl: _ssl.SSLContext | None = None,
    ) -> None:
        self.limit = limit
        self.keepalive = keepalive
        self.ssl = ssl
        self._pools: dict[str, Pool] = {}

    def pool(self, base: str) -> Pool:
        """The pool of `base` (scheme, host, optional port), made on first use."""
        pool = self._pools.get(base)
        if pool is None:
            parts = urlsplit(base)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"not an http(s) origin: {base!r}")
            tls = parts.scheme == "https"
            context = (self.ssl or _ssl.create_default_context()) if tls else None
            port = parts.port or (443 if tls else 80)
            pool = Pool(
                parts.hostname,
                port,
                ssl=context,
                limit=self.limit,
                keepalive=self.keepalive,
            )
            self._pools[base] = pool
        return pool

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()
        self._pools.clear()
