"""The gateway's client-side HTTP/1.1 protocol (`connections.py`) under uvicorn's server,
on a real socket, with small ASGI applications written here: what a client may send
(pipelining, chunked bodies, HTTP/1.0, oversized or malformed heads, upgrades, leaving)
and what the application may do (no length, a header carrying a line break, a slow
reader's back-pressure). The gateway's own behaviour on this protocol is in
tests/gateway/test_hostile.py.

Each test runs its own event loop, on asyncio and on uvloop; the server is stopped in a
`finally`."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator

import pytest
import uvicorn
from loops import event_loop_kind, run  # noqa: F401 (the fixture)
from servers import scaled

from tollgate_gateway import connections
from tollgate_gateway.asgi import ON_DISCONNECT, WRITE, ASGIApp, Receive, Scope, Send
from tollgate_gateway.connections import MAX_HEAD, client_protocol


@contextlib.asynccontextmanager
async def serving(
    app: ASGIApp, header_timeout: float = 30, idle_timeout: float = 30
) -> AsyncIterator[int]:
    """`app` under uvicorn with the gateway's protocol; its port."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        http=client_protocol(header_timeout, header_timeout, 100),
        timeout_keep_alive=idle_timeout,  # type: ignore[arg-type]
        lifespan="off",
        log_config=None,
    )
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.ensure_future(server.serve())
    try:
        deadline = asyncio.get_running_loop().time() + scaled(10)
        while not server.started:
            assert not task.done(), "the server stopped before it started"
            assert asyncio.get_running_loop().time() < deadline, "the server did not start"
            await asyncio.sleep(0.01)
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, scaled(10))


async def echo(scope: Scope, receive: Receive, send: Send) -> None:
    """The request's method, path and body back; a length unless the path is /chunked."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    answer = b"%s %s %s" % (scope["method"].encode(), scope["path"].encode(), body)
    headers = [(b"content-type", b"text/plain")]
    if scope["path"] != "/chunked":
        headers.append((b"content-length", b"%d" % len(answer)))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One response's head (lower-cased) and body, by content-length or chunked."""
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), scaled(10))).lower()
    if b"content-length: " in head:
        length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
        return head, await reader.readexactly(length)
    assert b"transfer-encoding: chunked" in head, head
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return head, body
        body += chunk[:-2]


async def closed(reader: asyncio.StreamReader) -> bool:
    with contextlib.suppress(ConnectionResetError):
        return await asyncio.wait_for(reader.read(), scaled(10)) == b""
    return True


def test_pipelined_requests_are_answered_in_order_with_chunked_bodies() -> None:
    async def main() -> None:
        async with serving(echo) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /one HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
                b"GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n"
                b"POST /three HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok"
            )
            answers = [await read_response(reader) for _ in range(3)]
            assert [body for _, body in answers] == [
                b"POST /one abcde",
                b"GET /chunked ",
                b"POST /three ok",
            ]
            assert b"transfer-encoding: chunked" in answers[1][0]
            assert all(b"connection: close" not in head for head, _ in answers)
            writer.close()

    run(main())


def test_http_1_0_and_connection_close_end_the_connection() -> None:
    async def main() -> None:
        async with serving(echo) as port:
            for request in (
                b"GET /a HTTP/1.0\r\n\r\n",
                b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            ):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                head, body = await read_response(reader)
                assert body == b"GET /a " and b"connection: close" in head
                assert await closed(reader)
                writer.close()

    run(main())


def test_a_header_carrying_a_line_break_is_never_written() -> None:
    async def injecting(scope: Scope, receive: Receive, send: Send) -> None:
        value = b"fine\r\nx-injected: 1" if scope["path"] == "/crlf" else b"fine\nx-injected: 1"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-v", value)]})
        await send({"type": "http.response.body", "body": b""})

    async def main() -> None:
        async with serving(injecting) as port:
            for path in (b"/crlf", b"/lf"):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
                head, _ = await read_response(reader)
                assert head.startswith(b"http/1.1 500"), head
                assert b"x-injected" not in head
                writer.close()

    run(main())


def test_malformed_and_oversized_heads_are_refused_and_closed() -> None:
    async def main() -> None:
        async with serving(echo) as port:
            for request, status in (
                (b"GET / HTTP/1.1\r\nHost x\r\n\r\n", b"400"),
                (b"GET /" + b"a" * MAX_HEAD + b" HTTP/1.1\r\n", b"431"),
                (b"GET / HTTP/1.1\r\n" + b"X-Big: a\r\n" * (MAX_HEAD // 8), b"431"),
            ):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                head, _ = await read_response(reader)
                assert head.startswith(b"http/1.1 " + status), head
                assert await closed(reader)
                writer.close()

    run(main())


def test_an_upgrade_is_answered_as_plain_http_then_closed() -> None:
    async def main() -> None:
        async with serving(echo) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
                b"\r\nnot http at all"
            )
            _, body = await read_response(reader)
            assert body == b"GET /ws "
            assert await closed(reader)
            writer.close()

    run(main())


def test_idle_connections_and_incomplete_heads_are_closed_at_their_deadlines() -> None:
    async def main() -> None:
        async with serving(echo, header_timeout=0.5, idle_timeout=0.5) as port:
            loop = asyncio.get_running_loop()
            silent = await asyncio.open_connection("127.0.0.1", port)
            partial = await asyncio.open_connection("127.0.0.1", port)
            partial[1].write(b"GET / HTTP/1.1\r\nHost")
            answered = await asyncio.open_connection("127.0.0.1", port)
            answered[1].write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_response(answered[0]))[1] == b"GET /a "
            started = loop.time()
            for reader, writer in (silent, partial, answered):
                assert await closed(reader)
                writer.close()
            assert loop.time() - started < scaled(5)

    run(main())


def test_the_application_hears_the_client_leave() -> None:
    heard: asyncio.Queue[str] = asyncio.Queue()

    async def waiting(scope: Scope, receive: Receive, send: Send) -> None:
        assert (await receive())["type"] == "http.request"
        heard.put_nowait((await receive())["type"])

    async def main() -> None:
        async with serving(waiting) as port:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.close()
            assert await asyncio.wait_for(heard.get(), scaled(10)) == "http.disconnect"

    run(main())


@pytest.mark.parametrize("way", ["send", "write"])
def test_a_slow_reader_holds_the_application_back(way: str) -> None:
    """A client that does not read makes the application's `send` wait (the transport's
    buffer is bounded), or `asgi.WRITE` say it has no room (an empty `send` then waits
    for it), and then gets every byte once it reads."""
    chunk, chunks = b"x" * 65536, 1000
    sent: list[int] = [0]

    async def streaming(scope: Scope, receive: Receive, send: Send) -> None:
        write = scope["extensions"][WRITE]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(chunks):
            if way == "send":
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            elif not write(chunk):
                await send({"type": "http.response.body", "body": b"", "more_body": True})
            sent[0] += 1
        await send({"type": "http.response.body", "body": b""})

    async def main() -> None:
        async with serving(streaming) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**20)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.sleep(scaled(0.5))
            held = sent[0]
            assert held < chunks // 2, f"{held} of {chunks} chunks sent to a client not reading"
            _, body = await read_response(reader)
            assert len(body) == len(chunk) * chunks
            writer.close()

    run(main())


def test_a_streams_head_goes_before_its_first_event() -> None:
    """A stream's head is written when the application sends it: a client whose stream
    has produced nothing yet (a long prompt's prefill) has its head, then its events.
    (Holding a stream's head back to go with its first event saved nothing measurable:
    docs/performance.md.)"""
    head_seen = asyncio.Event()

    async def slow_stream(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.wait_for(head_seen.wait(), scaled(10))
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def main() -> None:
        async with serving(slow_stream) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), scaled(10))
            assert b"transfer-encoding: chunked" in head.lower()
            head_seen.set()
            assert await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), scaled(10)) == (
                b"9\r\ndata: 1\n\n\r\n0\r\n\r\n"
            )
            writer.close()

    run(main())


def test_an_answer_before_an_expected_body_ends_the_connection() -> None:
    """A client waiting to send its body (`Expect: 100-continue`) that gets a final answer
    first will not send it: the connection closes rather than read its next request as
    that body. A client that sent its body anyway keeps its connection."""

    async def refusing(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-length", b"7")]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": b"refused"})

    async def main() -> None:
        async with serving(refusing) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
            )
            head, body = await read_response(reader)
            assert head.startswith(b"http/1.1 401") and b"connection: close" in head
            assert body == b"refused" and await closed(reader)
            writer.close()

            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello" * 2)
            for _ in range(2):
                head, _ = await read_response(reader)
                assert head.startswith(b"http/1.1 401") and b"connection: close" not in head
            writer.close()

    run(main())


def test_an_application_failing_before_its_body_is_a_500_not_half_an_answer() -> None:
    """A head with a length is written with the body: if the application fails between
    the two, nothing was sent, so the client gets a whole 500 rather than a 200 head on a
    connection that then closes."""

    async def failing(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-length", b"10")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        raise RuntimeError("failed between head and body")

    async def main() -> None:
        async with serving(failing) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            head, body = await read_response(reader)
            assert head.startswith(b"http/1.1 500"), head
            assert b'"code":"internal_error"' in body
            assert await closed(reader)
            writer.close()

    run(main())


def test_a_finished_request_is_freed_without_the_cycle_collector() -> None:
    """Every request's objects go when it ends, by reference counting: one left in a
    reference cycle waits for the cycle collector, whose passes cost the gateway ~5 % of
    its CPU under load (and a full pass over the heap stalls every request)."""

    async def registering(scope: Scope, receive: Receive, send: Send) -> None:
        on_disconnect = scope["extensions"][ON_DISCONNECT]
        on_disconnect(lambda: None)  # as the proxy does around its upstream call
        await receive()
        on_disconnect(None)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def requests_alive() -> int:
        return sum(1 for o in gc.get_objects() if type(o) is connections._Request)

    async def main() -> None:
        async with serving(registering) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(20):
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                _, body = await read_response(reader)
                assert body == b"ok"
            for _ in range(10):  # the last request's task ends after its last write
                await asyncio.sleep(0)
            alive = requests_alive()
            assert alive == 0, f"{alive} of 20 requests answered but not freed"
            writer.close()

    gc.collect()
    gc.disable()
    try:
        run(main())
    finally:
        gc.enable()
