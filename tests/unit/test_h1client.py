"""Conformance of the upstream HTTP/1.1 client (h1client) against real servers: the
simulator (`tollgate-sim`, counting connections and cancellations server-side) and tiny
asyncio servers written here for what the simulator cannot do (malformed answers, a head
that never comes, `Connection: close`, TLS).

Each test runs its own event loop (`asyncio.run`); every server is stopped in a `finally`
or by the `make_sim` fixture."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from loops import event_loop_kind, run  # noqa: F401 (the fixture)
from servers import Sim, scaled

from tollgate_gateway import h1client
from tollgate_gateway.h1client import Pool

CHAT = b'{"model":"sim-llama","messages":[{"role":"user","content":"hi there"}],"max_tokens":%d%s}'
JSON = {"content-type": "application/json"}
TARGET = "/v1/chat/completions"


def chat(
    pool: Pool, tokens: int, stream: bool = False, headers: dict[str, str] | None = None
) -> tuple[bytes, bytes]:
    body = CHAT % (tokens, b',"stream":true' if stream else b"")
    return pool.head("POST", TARGET, {**JSON, **(headers or {})}, len(body)), body


async def call(pool: Pool, method: str, path: str, body: bytes = b"", **kw: Any) -> bytes:
    """One request through `pool`, its whole body, the connection released."""
    head = pool.head(method, path, JSON if body else {}, len(body) if body else None)
    response = await pool.request(head, body, **kw)
    try:
        return await response.read()
    finally:
        response.release()


async def pieces_of(response: h1client.Response, into: list[bytes] | None = None) -> list[bytes]:
    """The body as `pump` hands it over, piece by piece (into `into`, if given)."""
    pieces = [] if into is None else into

    def take(piece: bytes) -> bool:
        pieces.append(piece)
        return True

    assert await response.pump(take), "a sink with room every time was paused"
    return pieces


async def stats(pool: Pool) -> dict[str, Any]:
    """The simulator's counters, read through the pool under test (so that reading them
    opens no connection of its own)."""
    result: dict[str, Any] = json.loads(await call(pool, "GET", "/sim/stats"))
    return result


async def poll(check: Callable[[], Awaitable[bool]], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + scaled(seconds)
    while not await check():
        assert time.monotonic() < deadline, "not within the deadline"
        await asyncio.sleep(0.02)


# Tiny servers

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def serve(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[list[int]]:
    """A local server running `handler` per connection; yields [port, connections]."""
    info = [0, 0]

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        info[1] += 1
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0, ssl=tls)
    info[0] = server.sockets[0].getsockname()[1]
    try:
        yield info
    finally:
        server.close()
        # Handlers that never return (a server that never answers) are cancelled here.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 1)


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return head


def answer(writer: asyncio.StreamWriter, body: bytes, *extra: bytes) -> None:
    headers = b"".join(h + b"\r\n" for h in extra)
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), headers, body))


async def keep_answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        await read_request(reader)
        answer(writer, b"ok")


# Keep-alive


def test_sequential_requests_share_one_connection(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim()

    async def main() -> None:
        pool = Pool("127.0.0.1", sim.port)
        await call(pool, "POST", "/sim/reset")
        for stream in (False, True, False, True):
            head, body = chat(pool, 8, stream)
            response = await pool.request(head, body, read_timeout=5)
            assert response.status == 200
            data = b"".join(await pieces_of(response)) if stream else await response.read()
            assert data.endswith(b"data: [DONE]\n\n" if stream else b"}")
            response.release()
        s = await stats(pool)
        assert s["connections"] == 0  # none since the reset, sent on the same connection
        assert s["completed"] == 4
        assert pool.connects == 1 and pool.count == 1
        await pool.close()

    run(main())


def test_server_closing_idle_connection_is_not_a_failure(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim("--keepalive-timeout-s", "0.2")

    async def main() -> None:
        pool = Pool("127.0.0.1", sim.port, keepalive=60)
        await call(pool, "POST", "/sim/reset")
        await call(pool, "POST", "/v1/chat/completions", chat(pool, 4)[1])
        await asyncio.sleep(0.6)  # the simulator closes the idle connection
        body = await call(pool, "POST", "/v1/chat/completions", chat(pool, 4)[1])
        assert b'"completion_tokens":4' in body
        s = await stats(pool)
        assert s["idle_closed"] >= 1
        assert s["connections"] == 1  # the one replacing the closed one (since the reset)
        assert pool.connects == 2
        await pool.close()

    run(main())


def test_race_with_server_closing_reused_connection_is_retried_once() -> None:
    """The server reads the second request on a connection and closes it unanswered (what
    a keep-alive timeout firing as the request arrives looks like): sent again on a new
    connection. On a new connection the same is a failure the caller sees."""

    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        answer(writer, b"first")
        await writer.drain()
        await read_request(reader)  # then close without a byte

    async def main() -> None:
        async with serve(answer_once) as info:
            pool = Pool("127.0.0.1", info[0])
            assert await call(pool, "GET", "/") == b"first"
            assert await call(pool, "GET", "/") == b"first"  # retried on connection 2
            assert info[1] == 2 and pool.connects == 2

        async def close_at_once(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await read_request(reader)

        async with serve(close_at_once) as info:
            pool = Pool("127.0.0.1", info[0])
            with pytest.raises(h1client.ServerDisconnected):
                await call(pool, "GET", "/")
            assert info[1] == 1  # not retried: a fresh connection
            assert pool.count == 0

    run(main())


def test_reset_before_answering_is_a_disconnect(make_sim: Callable[..., Sim]) -> None:
    """The simulator's `reset` fault: a TCP reset before any byte of the answer."""
    sim = make_sim()

    async def main() -> None:
        pool = Pool("127.0.0.1", sim.port)
        head, body = chat(pool, 4, headers={"x-sim-fault": "reset"})
        with pytest.raises(h1client.ServerDisconnected):
            await pool.request(head, body, read_timeout=5)
        assert pool.count == 0
        assert b'"completion_tokens":4' in await call(pool, "POST", TARGET, chat(pool, 4)[1])

    run(main())


def test_idle_connections_expire_client_side(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim()

    async def main() -> None:
        pool = Pool("127.0.0.1", sim.port, keepalive=0.2)
        await call(pool, "GET", "/health")
        await asyncio.sleep(0.4)
        await call(pool, "GET", "/health")
        assert pool.connects == 2 and pool.count == 1
        await pool.close()
        assert pool.count == 0

    run(main())


def test_connection_close_answers_are_not_reused() -> None:
    async def close_header(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:  # keeps the socket open: only the header says not to reuse it
            await read_request(reader)
            answer(writer, b"bye", b"connection: close")

    async def main() -> None:
        async with serve(close_header) as info:
            pool = Pool("127.0.0.1", info[0])
            assert await call(pool, "GET", "/") == b"bye"
            assert await call(pool, "GET", "/") == b"bye"
            assert info[1] == 2 and pool.connects == 2 and pool.count == 0

    run(main())


# Bodies


@pytest.mark.parametrize("mode", ["length", "chunked"])
def test_whole_bodies(make_sim: Callable[..., Sim], mode: str) -> None:
    sim = make_sim("--body-mode", mode)

    async def main() -> None:
        pool = Pool("127.0.0.1", sim.port)
        head, body = chat(pool, 16)
        response = await pool.request(head, body, read_timeout=5)
        names = {name.lower() for name, _ in response.headers}
        assert ("transfer-encoding" if mode == "chunked" else "content-length").encode() in names
        assert response.content_type == "application/json"
        answer = json.loads(await response.read())
        assert answer["usage"]["completion_tokens"] == 16
        response.release()
        await call(pool, "GET", "/health")
        assert pool.connects == 1  # a chunked body read to its end leaves it reusable
        await pool.close()

    run(main())


def test_sse_stream_arrives_in_pieces(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim("--itl-ms", "5")

    async def main() -> None:
        pool = Pool("127.0.0.1", sim.port)
        head, body = chat(pool, 64, stream=True)
        response = await pool.request(head, body, read_timeout=5)
        assert response.content_type.startswith("text/event-stream")
        pieces = await pieces_of(response)
        response.release()
        text = b"".join(pieces).decode()
        assert len(pieces) > 1
        events = [e for e in text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        assert sum('"content":' in e for e in events) >= 64
        await call(pool, "GET", "/health")
        assert pool.connects == 1
        await pool.close()

    run(main())


def test_close_delimited_body() -> None:
    async def old_style(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\npart one, ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"part two")

    async def main() -> None:
        async with serve(old_style) as info:
            pool = Pool("127.0.0.1", info[0])
            assert await call(pool, "GET", "/", read_timeout=5) == b"part one, part two"
            assert pool.count == 0  # never reused

    run(main())


# Malformed answers


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"HTTP/1.1 twohundred OK\r\n\r\n", h1client.ProtocolError),
        (b"SSH-2.0-OpenSSH_9.6\r\n", h1client.ProtocolError),
        (b"HTTP/1.1 200 OK\r\ncontent-le", h1client.ProtocolError),  # closed inside the head
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", h1client.BodyError),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nxx\r\n", h1client.BodyError),
    ],
)
def test_malformed_answers_are_errors(reply: bytes, error: type[h1client.H1Error]) -> None:
    async def bad(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply)

    async def main() -> None:
        async with serve(bad) as info:
            pool = Pool("127.0.0.1", info[0])
            with pytest.raises(error):
                await call(pool, "GET", "/", read_timeout=5)
            assert pool.count == 0

    run(main())


def test_request_head_and_header_injection() -> None:
    async def main() -> None:
        pool = Pool("127.0.0.1", 1)
        with pytest.raises(ValueError):
            pool.head("GET", "/", {"x-a": "1\r\nx-b: 2"}, None)
        with pytest.raises(ValueError):
            pool.head("GET", "/", {"x-a": "1\nx-b: 2"}, None)
        with pytest.raises(ValueError):
            pool.head("GET", "/", {"x-a\r": "1"}, None)
        with pytest.raises(ValueError):
            pool.head("HEAD", "/", {}, None)
        assert pool.head("POST", "/p?q=1", [("x-a", "1"), ("x-a", "2")], 3) == (
            b"POST /p?q=1 HTTP/1.1\r\nhost: 127.0.0.1:1\r\nx-a: 1\r\nx-a: 2\r\n"
            b"content-length: 3\r\n\r\n"
        )

    run(main())


# Failures to connect, timeouts


def test_refused_and_unknown_hosts_are_connect_errors() -> None:
    async def main() -> None:
        with socketless_port() as port:
            pool = Pool("127.0.0.1", port)
            with pytest.raises(h1client.ConnectError):
                await call(pool, "GET", "/", connect_timeout=5)
            assert pool.count == 0
        pool = Pool("no-such-host.invalid", 80)
        with pytest.raises(h1client.ConnectError):
            await call(pool, "GET", "/", connect_timeout=5)

    run(main())


@contextlib.contextmanager
def socketless_port() -> Any:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]  # bound, not listening: connections are refused


def test_connect_timeout() -> None:
    """A listener whose accept queue is full and never accepts: the SYN goes unanswered."""
    import socket

    listener = socket.socket()
    fillers = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)

        async def main() -> None:
            pool = Pool("127.0.0.1", port)
            started = time.monotonic()
            with pytest.raises(h1client.ConnectTimeout):
                await call(pool, "GET", "/", connect_timeout=0.3)
            assert time.monotonic() - started < scaled(2)
            assert pool.count == 0

        run(main())
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_first_byte_timeout_on_a_server_that_never_answers(make_sim: Callable[..., Sim]) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(3600)

    sim = make_sim()

    async def main() -> None:
        async with serve(silent) as info:
            pool = Pool("127.0.0.1", info[0])
            started = time.monotonic()
            with pytest.raises(h1client.ReadTimeout):
                await call(pool, "GET", "/", read_timeout=0.3)
            assert 0.25 < time.monotonic() - started < scaled(2)
            assert pool.count == 0
        pool = Pool("127.0.0.1", sim.port)
        await call(pool, "POST", "/sim/reset")
        head, body = chat(pool, 4, headers={"x-sim-fault": "stall"})
        with pytest.raises(h1client.ReadTimeout):
            await pool.request(head, body, read_timeout=0.3)
        assert pool.count == 0  # the stalled connection was closed, not kept
        assert (await stats(pool))["faults"] == 1
        await pool.close()

    run(main())


async def cancelled(pool: Pool, count: int) -> bool:
    return bool((await stats(pool))["cancelled"] >= count)


def test_idle_timeout_within_a_stream() -> None:
    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(b"6\r\ndata: \r\n")
        await writer.drain()
        await asyncio.sleep(3600)

    async def main() -> None:
        async with serve(stalls) as info:
            pool = Pool("127.0.0.1", info[0])
            response = await pool.request(pool.head("GET", "/", {}, None), read_timeout=0.3)
            got: list[bytes] = []
            with pytest.raises(h1client.ReadTimeout):
                await pieces_of(response, got)
            assert got == [b"data: "]
            response.release()
            assert pool.count == 0

    run(main())


def test_a_full_sink_holds_the_server_back_until_pumped_again() -> None:
    """A sink with no room stops the reading: the server's writes back up (it cannot
    send the whole body into the gateway's memory), no read timeout fires while the
    gateway is the one not reading, and the next `pump` gets every byte in order."""
    piece, pieces = b"x" * 65536, 400  # 25 MiB: far past every socket buffer on the way
    written = [0]

    async def floods(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for i in range(pieces):
            writer.write(b"%x\r\n%b\r\n" % (len(piece), bytes([65 + i % 26]) * len(piece)))
            await writer.drain()
            written[0] += 1
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        async with serve(floods) as info:
            pool = Pool("127.0.0.1", info[0])
            response = await pool.request(pool.head("GET", "/", {}, None), read_timeout=0.3)
            got: list[bytes] = []

            def full(data: bytes) -> bool:
                got.append(data)
                return False

            assert not await response.pump(full), "a full sink did not stop the pump"
            await asyncio.sleep(scaled(1))  # past the read timeout
            held = written[0]
            assert held < pieces // 2, f"{held} of {pieces} pieces written while not read"
            await pieces_of(response, got)
            body = b"".join(got)
            assert len(body) == len(piece) * pieces
            assert body[:: len(piece)] == bytes(65 + i % 26 for i in range(pieces))
            response.release()
            assert pool.count == 1  # read to its end: the connection is kept
            await pool.close()

    run(main())


def test_a_sink_that_fails_fails_the_pump_and_closes_the_connection(
    make_sim: Callable[..., Sim],
) -> None:
    sim = make_sim("--itl-ms", "5")

    async def main() -> None:
        pool = Pool("127.0.0.1", sim.port)
        head, body = chat(pool, 32, stream=True)
        response = await pool.request(head, body, read_timeout=5)

        def broken(data: bytes) -> bool:
            raise ValueError("the sink's own error")

        with pytest.raises(ValueError, match="the sink's own error"):
            await response.pump(broken)
        response.release()
        assert pool.count == 0  # not reused: its state is unknown
        await pool.close()

    run(main())


def test_a_slow_steady_stream_does_not_time_out(make_sim: Callable[..., Sim]) -> None:
    """The read timeout bounds each gap, not the whole stream."""
    sim = make_sim("--itl-ms", "100")

    async def main() -> None:
        pool = Pool("127.0.0.1", sim.port)
        head, body = chat(pool, 10, stream=True)
        started = time.monotonic()
        response = await pool.request(head, body, read_timeout=0.5)
        data = b"".join(await pieces_of(response))
        response.release()
        assert time.monotonic() - started > 0.8
        assert data.endswith(b"data: [DONE]\n\n")
        await pool.close()

    run(main())


# Cancellation, the connection limit


def test_cancelling_the_reader_closes_the_upstream_connection(
    make_sim: Callable[..., Sim],
) -> None:
    sim = make_sim("--itl-ms", "50")

    async def main() -> None:
        pool = Pool("127.0.0.1", sim.port)
        control = Pool("127.0.0.1", sim.port)
        await call(control, "POST", "/sim/reset")
        first = asyncio.Event()

        async def reader() -> None:
            head, body = chat(pool, 200, stream=True)
            response = await pool.request(head, body, read_timeout=5)

            def take(piece: bytes) -> bool:
                first.set()
                return True

            try:
                await response.pump(take)
            finally:
                response.release()

        task = asyncio.create_task(reader())
        await asyncio.wait_for(first.wait(), scaled(5))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await poll(lambda: cancelled(control, 1))
        s = await stats(control)
        assert s["active"] == 0 and s["completed"] == 0
        assert pool.count == 0
        await control.close()

    run(main())


def test_connection_limit_queues_without_counting_toward_connect_timeout(
    make_sim: Callable[..., Sim],
) -> None:
    sim = make_sim("--ttft-ms", "300")

    async def main() -> None:
        pool = Pool("127.0.0.1", sim.port, limit=2)
        head, body = chat(pool, 4)

        async def one() -> float:
            started = time.monotonic()
            response = await pool.request(head, body, connect_timeout=0.1, read_timeout=5)
            await response.read()
            response.release()
            return time.monotonic() - started

        took = await asyncio.gather(one(), one(), one())
        assert pool.connects == 2 and pool.count == 2
        assert max(took) > 0.55  # the third waited for a connection (> 0.1 s) and got it
        # A waiter cancelled in the queue leaves no slot behind.
        holders = [await pool.request(head, body, read_timeout=5) for _ in range(2)]
        waiting = asyncio.create_task(pool.request(head, body))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        for response in holders:
            await response.read()
            response.release()
        assert pool.count == 2 and not pool._waiters
        assert (await one()) < 0.3 + scaled(1)
        assert pool.connects == 2
        await pool.close()

    run(main())


# TLS


def self_signed(tmp: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, made with the cryptography package if
    installed, else the openssl CLI; skipped if neither is there."""
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    try:
        import cryptography  # noqa: F401
    except ImportError:
        openssl = shutil.which("openssl")
        if openssl is None:
            pytest.skip("neither the cryptography package nor the openssl CLI is installed")
        subprocess.run(
            [
                *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
                *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"),
                *("-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
            ],
            check=True,
            capture_output=True,
        )
        return cert, key
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, key


def test_tls_upstream(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert, key)

    async def main() -> None:
        async with serve(keep_answering, tls=server_side) as info:
            trusting = ssl.create_default_context(cafile=str(cert))
            pool = Pool("127.0.0.1", info[0], ssl=trusting)
            assert await call(pool, "GET", "/", connect_timeout=5, read_timeout=5) == b"ok"
            assert await call(pool, "GET", "/", connect_timeout=5, read_timeout=5) == b"ok"
            assert info[1] == 1
            await pool.close()
            by_name = Pool("localhost", info[0], ssl=trusting)
            assert by_name.authority == f"localhost:{info[0]}"
            assert await call(by_name, "GET", "/", connect_timeout=5) == b"ok"
            await by_name.close()
            # The system's trust store does not know the certificate: refused.
            untrusting = Pool("127.0.0.1", info[0], ssl=ssl.create_default_context())
            with pytest.raises(h1client.ConnectError):
                await call(untrusting, "GET", "/", connect_timeout=5)
            assert untrusting.count == 0

    run(main())


def test_client_pools_by_origin(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim()

    async def main() -> None:
        client = h1client.Client(limit=3)
        pool = client.pool(sim.url)
        assert client.pool(sim.url) is pool
        assert pool.limit == 3 and pool.ssl is None
        assert client.pool("https://example.invalid").ssl is not None
        with pytest.raises(ValueError):
            client.pool("ftp://example.invalid")
        assert await call(pool, "GET", "/health") == b""
        await client.close()
        assert pool.count == 0

    run(main())
