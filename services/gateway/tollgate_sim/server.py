"""An HTTP/1.1 server on asyncio + httptools that answers like vLLM's OpenAI server.

It is written on the bare protocol, not a framework, because benchmarks measure the
gateway against it: the simulator must spend far less CPU per request than the gateway,
or the figures would measure the simulator. With no delays a whole stream leaves in one
`write`; with delays each token is its own chunked-encoding chunk, as uvicorn sends them.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, cast

import httptools

from tollgate_sim import wire
from tollgate_sim.knobs import Knobs


@dataclass
class Stats:
    """What the simulator saw, for tests and benchmarks (`GET /sim/stats`)."""

    requests: int = 0
    completed: int = 0
    # Streams or responses the client abandoned before the simulator finished them.
    cancelled: int = 0
    faults: int = 0
    # Usage the simulator reported in `usage` objects (what a gateway should account).
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Tokens actually written, also those of cut or cancelled streams.
    tokens_sent: int = 0
    active: int = 0
    last_headers: dict[str, str] = field(default_factory=dict)


class Simulator:
    """Shared state: the knobs, the stats and the listening server."""

    def __init__(self, knobs: Knobs, host: str, port: int) -> None:
        self.knobs = knobs
        self.stats = Stats()
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self.connections: set[_Connection] = set()
        self._reopen: asyncio.TimerHandle | None = None

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
    """One client connection; requests on it are handled one at a time (no pipelining)."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.task: asyncio.Task[None] | None = None
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.sim.connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._write_response(400, b'{"detail":"bad request"}', keep_alive=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.sim.connections.discard(self)

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
        path = self.url.split(b"?", 1)[0]
        self.task = asyncio.get_running_loop().create_task(
            self._handle(method, path, body, keep_alive)
        )

    # Requests
    async def _handle(self, method: bytes, path: bytes, body: bytes, keep_alive: bool) -> None:
        sim = self.sim
        if path == b"/health":
            self._write_response(200, b"", keep_alive, content_type=None)
        elif path == b"/v1/models" and method == b"GET":
            self._write_response(200, wire.models(sim.knobs.model), keep_alive)
        elif path in (b"/v1/chat/completions", b"/v1/completions") and method == b"POST":
            await self._completion(path == b"/v1/chat/completions", body, keep_alive)
        elif path == b"/sim/stats":
            stats = {k: v for k, v in vars(sim.stats).items()}
            self._write_response(200, json.dumps(stats).encode(), keep_alive)
        elif path == b"/sim/config" and method == b"POST":
            self._configure(body, keep_alive)
        elif path == b"/sim/reset" and method == b"POST":
            sim.stats = Stats()
            self._write_response(200, b"{}", keep_alive)
        else:
            self._write_response(404, b'{"detail":"Not Found"}', keep_alive)

    def _configure(self, body: bytes, keep_alive: bool) -> None:
        try:
            changes = json.loads(body or b"{}")
            refuse_s = float(changes.pop("refuse_for_s", 0))
            self.sim.knobs = self.sim.knobs.updated(changes)
        except (ValueError, TypeError, AttributeError) as exc:
            detail = json.dumps({"detail": str(exc)}).encode()
            self._write_response(400, detail, keep_alive)
            return
        self._write_response(200, json.dumps(vars(self.sim.knobs)).encode(), keep_alive)
        if refuse_s > 0:
            self.sim.refuse_for(refuse_s)

    async def _completion(self, chat: bool, body: bytes, keep_alive: bool) -> None:
        sim = self.sim
        stats = sim.stats
        stats.requests += 1
        stats.last_headers = {k.decode(): v.decode() for k, v in self.headers.items()}
        try:
            knobs = sim.knobs.with_headers(self.headers)
            rid = self.headers.get(b"x-request-id")
            request = wire.parse_request(body, chat, knobs, rid.decode() if rid else None)
        except wire.BadRequest as exc:
            self._write_response(exc.status, exc.body(), keep_alive)
            return
        except ValueError as exc:
            self._write_response(400, wire.error(str(exc), 400), keep_alive)
            return

        fault = knobs.fault
        if fault != "none" and (knobs.fault_rate >= 1.0 or random.random() < knobs.fault_rate):
            stats.faults += 1
            if fault == "error":
                status = knobs.error_status
                self._write_response(status, wire.error("simulated failure", status), keep_alive)
                return
            if fault == "reset":
                self._abort()
                return
            if fault == "stall":
                return  # never answer; the client gives up and closes
        else:
            fault = "none"

        if knobs.ttft_ms:
            await asyncio.sleep(knobs.ttft_ms / 1000)
        if not request.stream:
            if self.closed:
                stats.cancelled += 1
                return
            stats.tokens_sent += request.max_tokens
            self._count_usage(request)
            self._write_response(200, wire.full_response(request), keep_alive)
            stats.completed += 1
            return
        await self._stream(request, knobs, fault == "cut", keep_alive)

    async def _stream(
        self, request: wire.Request, knobs: Knobs, cut: bool, keep_alive: bool
    ) -> None:
        stats = self.sim.stats
        assert self.transport is not None
        write = self.transport.write
        limit = min(knobs.cut_after, request.max_tokens) if cut else request.max_tokens
        write(wire.stream_head(keep_alive))
        stats.active += 1
        try:
            events = wire.stream_events(request)
            if not knobs.itl_ms:
                # Everything at once: one write, the cheapest possible upstream.
                chunks = []
                for kind, event in events:
                    if kind == "token":
                        if limit == 0:
                            break
                        limit -= 1
                        stats.tokens_sent += 1
                    chunks.append(wire.chunk(event))
                write(b"".join(chunks))
            else:
                delay = knobs.itl_ms / 1000
                first = True
                for kind, event in events:
                    if self.closed:
                        stats.cancelled += 1
                        return
                    if kind == "token":
                        if limit == 0:
                            break
                        limit -= 1
                        stats.tokens_sent += 1
                        if not first:
                            await asyncio.sleep(delay)
                        first = False
                        if self.closed:
                            stats.cancelled += 1
                            return
                    write(wire.chunk(event))
            if cut and knobs.cut_after < request.max_tokens:
                self._abort()
                return
            write(wire.LAST_CHUNK)
            if request.include_usage:
                self._count_usage(request)
            stats.completed += 1
            if not keep_alive:
                self.transport.close()
        finally:
            stats.active -= 1

    # Output helpers
    def _count_usage(self, request: wire.Request) -> None:
        self.sim.stats.prompt_tokens += request.prompt_tokens
        self.sim.stats.completion_tokens += request.max_tokens

    def _write_response(
        self,
        status: int,
        body: bytes,
        keep_alive: bool,
        content_type: bytes | None = b"application/json",
    ) -> None:
        if self.transport is None or self.closed:
            return
        self.transport.write(wire.response(status, body, keep_alive, content_type))
        if not keep_alive:
            self.transport.close()

    def _abort(self) -> None:
        """Drop the connection with a TCP reset, the way a crashed server's peer sees it."""
        if self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


def describe(sim: Simulator) -> dict[str, Any]:
    return {"host": sim.host, "port": sim.port, **vars(sim.knobs)}
