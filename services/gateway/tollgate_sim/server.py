"""An HTTP/1.1 server on asyncio + httptools that answers like vLLM's OpenAI server.

It is written on the bare protocol, not a framework, because benchmarks measure the
gateway against it: the simulator must spend far less CPU per request than the gateway,
or the figures would measure the simulator. Requests on a connection are handled one at
a time (no pipelining); the client closing the connection cancels its request's task.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from typing import Any, cast

import httptools

from tollgate_sim import http, routes
from tollgate_sim.errors import METHOD_NOT_ALLOWED, NOT_FOUND, ApiError, openai_error
from tollgate_sim.exchange import Exchange
from tollgate_sim.knobs import Knobs
from tollgate_sim.state import State

_MAX_ROUTES = 256


class Simulator:
    """The process: its state and the listening server."""

    def __init__(self, knobs: Knobs, host: str, port: int) -> None:
        self.state = State(knobs)
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self.connections: set[_Connection] = set()
        self._reopen: asyncio.TimerHandle | None = None

    @property
    def knobs(self) -> Knobs:
        return self.state.knobs

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._server = await loop.create_server(lambda: _Connection(self), sock=sock, backlog=1024)

    def refuse_for(self, seconds: float) -> None:
        """Stop listening for a while, so connections are refused (ECONNREFUSED), and
        close the open ones, as a restarting server would."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
        loop = asyncio.get_running_loop()
        if self._reopen is not None:
            self._reopen.cancel()
        self._reopen = loop.call_later(seconds, lambda: loop.create_task(self.start()))


class _Connection(asyncio.Protocol):
    """One client connection, and the Wire its requests' handlers write to."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self._idle: asyncio.TimerHandle | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.sim.connections.add(self)
        self.sim.state.stats.connections += 1
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None and not self.closed:
                body = b'{"detail":"bad request"}'
                self.transport.write(http.response(400, body, False, http.JSON))
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.sim.connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = {}
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        keep_alive = self.parser.should_keep_alive()
        body = b"".join(self.body)
        path, _, query = self.url.partition(b"?")
        self.task = asyncio.get_running_loop().create_task(
            self._handle(method, path, query, body, keep_alive)
        )

    # Wire
    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def finish(self, keep_alive: bool) -> None:
        if self.transport is None or self.closed:
            return
        if not keep_alive:
            self.transport.close()
            return
        timeout = self.sim.knobs.keepalive_timeout_s
        if timeout > 0:
            self._idle = asyncio.get_running_loop().call_later(timeout, self._close_idle)

    def _close_idle(self) -> None:
        self._idle = None
        if self.transport is not None and not self.closed:
            self.sim.state.stats.idle_closed += 1
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection with a TCP reset, the way a crashed server's peer sees it."""
        if self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    # Requests
    async def _handle(
        self, method: bytes, path: bytes, query: bytes, body: bytes, keep_alive: bool
    ) -> None:
        if path == b"/health":
            self._reply(200, b"", keep_alive, None)
            return
        if path.startswith(b"/sim/"):
            self._control(method, path, body, keep_alive)
            return
        state = self.sim.state
        stats = state.stats
        stats.body_bytes += len(body)
        # Recorded raw; /sim/stats decodes them, so a request pays no more than this.
        route = (method, path)
        seen = stats.routes_raw
        if route in seen or len(seen) < _MAX_ROUTES:
            seen[route] = seen.get(route, 0) + 1
        stats.recent.append((method, path, self.headers))
        handler, params, exists = routes.find(method, path)
        if handler is None:
            status, reply = (405, METHOD_NOT_ALLOWED) if exists else (404, NOT_FOUND)
            self._reply(status, reply, keep_alive)
            return
        if method == b"POST" or b"/v1/responses/" in path:
            stats.last_raw = self.headers
        if method == b"POST" and path not in _NOT_INFERENCE and b"/v1/responses/" not in path:
            stats.requests += 1
        try:
            knobs = state.knobs.with_headers(self.headers)
        except ValueError as exc:
            self._reply(400, openai_error(str(exc), 400), keep_alive)
            return
        ex = Exchange(
            state, self, method, path.decode("latin-1"), query.decode("latin-1"),
            self.headers, body, keep_alive, knobs, params=params,
        )  # fmt: skip
        try:
            await handler(ex)
        except ApiError as exc:
            ex.send_error(exc)

    def _control(self, method: bytes, path: bytes, body: bytes, keep_alive: bool) -> None:
        state = self.sim.state
        if path == b"/sim/stats":
            self._reply(200, json.dumps(state.stats.as_json(state.engine)).encode(), keep_alive)
        elif path == b"/sim/config" and method == b"POST":
            self._configure(body, keep_alive)
        elif path == b"/sim/reset" and method == b"POST":
            state.reset()
            self._reply(200, b"{}", keep_alive)
        else:
            self._reply(404, NOT_FOUND, keep_alive)

    def _configure(self, body: bytes, keep_alive: bool) -> None:
        state = self.sim.state
        try:
            changes = json.loads(body or b"{}")
            refuse_s = float(changes.pop("refuse_for_s", 0))
            state.knobs = state.knobs.updated(changes)
        except (ValueError, TypeError, AttributeError) as exc:
            self._reply(400, json.dumps({"detail": str(exc)}).encode(), keep_alive)
            return
        self._reply(200, json.dumps(vars(state.knobs)).encode(), keep_alive)
        if refuse_s > 0:
            self.sim.refuse_for(refuse_s)

    def _reply(
        self, status: int, body: bytes, keep_alive: bool, content_type: bytes | None = http.JSON
    ) -> None:
        if self.transport is None or self.closed:
            return
        self.transport.write(http.response(status, body, keep_alive, content_type))
        self.finish(keep_alive)


# POSTs that compute nothing on the engine, so they are not `requests`.
_NOT_INFERENCE = {b"/tokenize", b"/detokenize", b"/v1/messages/count_tokens"}


def describe(sim: Simulator) -> dict[str, Any]:
    return {"host": sim.host, "port": sim.port, **vars(sim.knobs)}
