"""The gateway against hostile and careless clients, on real processes: nothing a client
sends can make it spend more than a key's quota, pin its connections, or crash a request;
nothing it loses at shutdown."""

from __future__ import annotations

import datetime as dt
import json
import signal
import socket
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from configfile import MountedSecret, document
from servers import KEY_A, KEY_B, Gateway, scaled

AUTH = {"authorization": f"Bearer {KEY_A}"}
CHAT = {"model": "sim-llama", "messages": [{"role": "user", "content": "hello there"}]}


def _chat(gw: Gateway, body: dict, key: str = KEY_A, **headers: str) -> httpx.Response:
    return httpx.post(
        gw.url + "/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}", **headers},
        timeout=scaled(20),
    )


def _usage(gw: Gateway, key: str) -> dict:
    return httpx.get(gw.url + "/v1/usage", headers={"authorization": f"Bearer {key}"}).json()


def _db_tokens(db: Path, key: str) -> int:
    with sqlite3.connect(db) as conn:
        row = conn.execute(
            "SELECT sum(prompt_tokens + completion_tokens) FROM tollgate_usage WHERE key_name = ?",
            (key,),
        ).fetchone()
    return int(row[0] or 0)


# 1. `n` and `best_of` cannot multiply a quota.


def test_n_is_reserved_for_every_sequence(make_sim, make_gateway, tmp_path) -> None:
    sim = make_sim()
    secret = MountedSecret(tmp_path / "config")
    secret.write(
        document({"sk-day": {"name": "day", "policy": "day"}}, {"day": {"tokensPerDay": 5000}})
    )
    gw = make_gateway(sim.url, GATEWAY_CONFIG_FILE=str(secret.path))

    # One request that could generate 128 x 100 tokens does not fit in 5,000.
    r = _chat(gw, {**CHAT, "n": 128, "max_tokens": 100}, key="sk-day")
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
    assert "12800" in r.json()["error"]["message"]
    assert sim.stats()["requests"] == 0

    # Concurrent requests of n=8 x 200: only as many as fit are admitted.
    codes: list[int] = []

    def one() -> None:
        headers = {"x-sim-ttft-ms": "300"}
        codes.append(
            _chat(gw, {**CHAT, "n": 8, "max_tokens": 200}, "sk-day", **headers).status_code
        )

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [200, 200, 200, 429, 429, 429]
    used = gw.wait_for(
        lambda: (u := _usage(gw, "sk-day"))["requests"] >= 3 and u, "usage of the 3 requests"
    )
    assert used["tokens_used"] <= 5000
    # The upstream generated every sequence it was asked for, and all of them were counted.
    assert used["completion_tokens"] == sim.stats()["completion_tokens"]


@pytest.mark.parametrize(
    "field,value", [("n", 0), ("n", 129), ("n", "2"), ("best_of", True), ("n", 1.5)]
)
def test_bad_n_is_a_400(gateway: Gateway, field: str, value: object) -> None:
    r = _chat(gateway, {**CHAT, field: value, "max_tokens": 1})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == field


# 2. Usage is never lost at the drain deadline.


@pytest.mark.parametrize("second_signal", [False, True])
def test_streams_cut_at_the_drain_deadline_keep_their_usage(
    make_sim, make_gateway, tmp_path, second_signal: bool
) -> None:
    sim = make_sim()
    db = tmp_path / "usage.db"
    gw = make_gateway(sim.url, DATABASE_URL=f"sqlite:///{db}", GATEWAY_DRAIN_SECONDS="1.5")
    streams = 4
    received: list[bytes] = [b""] * streams
    first_bytes = threading.Barrier(streams + 1)

    def stream(i: int) -> None:
        body = {**CHAT, "stream": True, "max_tokens": 400}
        with httpx.stream(
            "POST",
            gw.url + "/v1/chat/completions",
            json=body,
            headers={**AUTH, "x-sim-itl-ms": "25"},
            timeout=scaled(30),
        ) as r:
            for part in r.iter_raw():
                if not received[i]:
                    first_bytes.wait()
                received[i] += part

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    first_bytes.wait()
    gw.signal(signal.SIGTERM)
    if second_signal:
        time.sleep(0.2)
        gw.signal(signal.SIGTERM)
    for t in threads:
        t.join(scaled(30))
    assert gw.wait_exit(30) == 0
    # Every client got an error event it can raise, not a silently truncated stream.
    for data in received:
        assert b'"code":"gateway_shutting_down"' in data.rsplit(b"\n\n", 2)[-2]
    entries = gw.requests()
    assert len(entries) == streams
    assert all(e["error"] == "gateway_shutting_down" for e in entries)
    logged = sum(e["prompt_tokens"] + e["completion_tokens"] for e in entries)
    streamed = sum(e["completion_tokens"] for e in entries)
    # What was streamed was counted (every stream had its first tokens) and reached the
    # store.
    assert all(e["completion_tokens"] >= 1 and e["usage_exact"] is False for e in entries)
    assert streamed <= sim.stats()["tokens_sent"]
    assert _db_tokens(db, "team-a") == logged
    assert '"event":"quota_lost"' not in gw.output()


# 4. A prompt the upstream processed is charged, even if the client leaves early.


def test_a_client_that_leaves_before_the_first_token_pays_for_its_prompt(
    make_sim, make_gateway
) -> None:
    sim = make_sim()
    gw = make_gateway(sim.url)
    prompt = "word " * 2000
    body = {"model": "sim-llama", "messages": [{"role": "user", "content": prompt}]}
    for stream in (True, False):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                gw.url + "/v1/chat/completions",
                json={**body, "stream": stream, "max_tokens": 5},
                headers={**AUTH, "x-sim-ttft-ms": "4000"},
                timeout=0.5,
            )
    usage = gw.wait_for(
        lambda: (u := _usage(gw, KEY_A))["requests"] == 2 and u["prompt_tokens"] and u,
        "both requests to be settled",
    )
    # Estimated at 4 bytes a token: 10,000 bytes of prompt.
    assert usage["prompt_tokens"] >= 2 * 2000
    entries = gw.requests()
    assert all(e["usage_exact"] is False and e["status"] == 499 for e in entries)


# 6. Overload: the gateway's own queue is not the upstream's failure.


def test_waiting_for_an_upstream_connection_is_not_an_upstream_failure(
    make_sim, make_gateway
) -> None:
    sim = make_sim()
    gw = make_gateway(
        sim.url,
        UPSTREAM_MAX_CONNECTIONS="1",
        UPSTREAM_CONNECT_TIMEOUT_SECONDS="0.3",
        BREAKER_FAILURE_THRESHOLD="1",
    )
    codes: list[int] = []

    def slow() -> None:
        body = {**CHAT, "max_tokens": 2}
        codes.append(_chat(gw, body, **{"x-sim-ttft-ms": "1500"}).status_code)

    threads = [threading.Thread(target=slow) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Each waited for the one connection, longer than the connect timeout: all served.
    assert codes == [200, 200, 200]
    assert "closed -> open" not in gw.output()


def test_past_its_limit_of_requests_in_flight_the_gateway_sheds_at_once(
    make_sim, make_gateway
) -> None:
    sim = make_sim()
    gw = make_gateway(sim.url, GATEWAY_MAX_IN_FLIGHT="2")
    holders = [
        threading.Thread(target=_chat, args=(gw, CHAT), kwargs={"x-sim-ttft-ms": "2000"})
        for _ in range(2)
    ]
    for t in holders:
        t.start()
    gw.wait_for(
        lambda: "tollgate_requests_in_flight 2.0" in httpx.get(gw.url + "/metrics").text,
        "two requests to hold the gateway",
    )
    started = time.monotonic()
    r = _chat(gw, CHAT)
    assert r.status_code == 503 and r.json()["error"]["code"] == "gateway_overloaded"
    assert int(r.headers["retry-after"]) >= 1
    assert time.monotonic() - started < scaled(1)
    for t in holders:
        t.join()
    assert _chat(gw, CHAT).status_code == 200


# 7. Client-side deadlines and a connection cap.


def _connect(gw: Gateway) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gw.port))
    sock.settimeout(scaled(10))
    return sock


def _error_answer(sock: socket.socket) -> bytes:
    """An error answer the gateway ends the connection after: up to its JSON's end."""
    answer = b""
    while not answer.endswith(b"}}"):
        part = sock.recv(65536)
        if not part:
            break
        answer += part
    return answer


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def test_slow_idle_and_bodiless_clients_are_cut_off(make_sim, make_gateway) -> None:
    sim = make_sim()
    gw = make_gateway(sim.url, GATEWAY_HEADER_TIMEOUT_SECONDS="1", GATEWAY_BODY_TIMEOUT_SECONDS="1")
    idle = _connect(gw)  # never sends a byte
    slowloris = _connect(gw)
    headers = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test-a\r\n"
    )
    started = time.monotonic()
    try:
        for byte in headers:  # one byte at a time, never finishing the headers
            slowloris.send(bytes([byte]))
            time.sleep(0.05)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert time.monotonic() - started < scaled(4)
    assert _closed(slowloris)
    assert _closed(idle)

    # A declared body that never comes: the request ends as a client disconnect.
    bodiless = _connect(gw)
    bodiless.send(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test-a\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\nX-Request-Id: no-body\r\n"
        b'\r\n{"model":'
    )
    assert _closed(bodiless)
    assert gw.request_log("no-body")["client_disconnected"] is True
    # Ordinary clients are unaffected.
    assert _chat(gw, CHAT).status_code == 200


def test_past_the_connection_cap_a_client_gets_503(make_sim, make_gateway) -> None:
    sim = make_sim()
    gw = make_gateway(sim.url, GATEWAY_MAX_CONNECTIONS="3", GATEWAY_HEADER_TIMEOUT_SECONDS="30")
    held = [_connect(gw) for _ in range(3)]
    extra = _connect(gw)
    answer = _error_answer(extra)
    assert answer.startswith(b"HTTP/1.1 503")
    assert b'"code":"gateway_overloaded"' in answer
    for sock in held:
        sock.close()
    gw.wait_for(lambda: _chat(gw, CHAT).status_code == 200, "a new client to be served again")


def test_request_heads_are_bounded(gateway: Gateway) -> None:
    """Headers past 64 KiB get an OpenAI-shaped 431; a header line that never ends is not
    buffered until the header deadline: the gateway stops reading it after 1 MiB."""
    sock = _connect(gateway)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        + b"X-Pad: %s\r\n" % (b"a" * 1000) * 70
        + b"\r\n"
    )
    answer = _error_answer(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == (
        "request_header_too_large"
    )
    assert _closed(sock)

    endless = _connect(gateway)
    endless.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Pad: ")
    started, sent = time.monotonic(), 0
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        while sent < 256 << 20:
            sent += endless.send(b"a" * 65536)
    # (Kernel buffers hold a few MiB more than the gateway read.)
    assert sent < 64 << 20, f"the gateway took {sent >> 20} MiB of one header"
    assert time.monotonic() - started < scaled(5)
    assert _chat(gateway, CHAT).status_code == 200


def _response(sock: socket.socket, buffer: bytearray, head_only: bool = False) -> bytes:
    """One response off a keep-alive connection: its head, then content-length bytes."""
    while b"\r\n\r\n" not in buffer:
        part = sock.recv(65536)
        assert part, f"the connection closed mid-response: {bytes(buffer)!r}"
        buffer += part
    end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:end]).lower()
    length = 0 if head_only else int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(buffer) < end + length:
        part = sock.recv(65536)
        assert part, "the connection closed mid-body"
        buffer += part
    answer = bytes(buffer[: end + length])
    del buffer[: end + length]
    return answer


def test_head_pipelining_and_100_continue_on_one_connection(gateway: Gateway) -> None:
    """What a change to how responses are written must keep: a HEAD's answer (a head and
    no body), pipelined requests answered in order, and a 100 Continue sent at once,
    before the body it asks for."""
    sock = _connect(gateway)
    buffer = bytearray()
    sock.sendall(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
    head = _response(sock, buffer, head_only=True)
    assert head.startswith(b"HTTP/1.1 "), head
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
    assert [_response(sock, buffer)[:12] for _ in range(2)] == [b"HTTP/1.1 200"] * 2
    body = json.dumps({**CHAT, "max_tokens": 2}).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + KEY_A.encode()
        + b"\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
        + b"Content-Length: %d\r\n\r\n" % len(body)
    )
    assert _response(sock, buffer, head_only=True).startswith(b"HTTP/1.1 100 ")
    sock.sendall(body)
    answer = _response(sock, buffer)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["usage"]["completion_tokens"] == 2
    sock.close()


# 8 and 10: bodies and headers no client should be able to break anything with.


def test_deeply_nested_json_is_a_400(gateway: Gateway) -> None:
    body = b'{"model":"sim-llama","messages":' + b"[" * 100000 + b"]" * 100000 + b"}"
    r = httpx.post(
        gateway.url + "/v1/chat/completions",
        content=body,
        headers={**AUTH, "content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert "Traceback" not in gateway.output()


def test_a_body_that_is_not_utf8_is_a_400(gateway: Gateway) -> None:
    body = json.dumps({**CHAT, "stream": True}).encode("utf-16")
    r = httpx.post(
        gateway.url + "/v1/chat/completions",
        content=body,
        headers={**AUTH, "content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_encoding"


def test_two_keys_in_one_request_are_refused_on_every_route(gateway: Gateway) -> None:
    two = [("authorization", f"Bearer {KEY_A}"), ("authorization", f"Bearer {KEY_B}")]
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/usage"),
                         ("GET", "/v1/models")):  # fmt: skip
        r = httpx.request(method, gateway.url + path, json=CHAT, headers=two)
        assert r.status_code == 400, path
        assert "more than one" in r.json()["error"]["message"]
        assert r.headers["x-request-id"]


def test_models_are_filtered_by_key_and_retrievable(make_sim, make_gateway, tmp_path) -> None:
    sim = make_sim()
    secret = MountedSecret(tmp_path / "config")
    secret.write(
        document(
            {
                "sk-all": {"name": "all"},
                "sk-none": {"name": "none", "models": ["not-served"]},
            }
        )
    )
    gw = make_gateway(sim.url, GATEWAY_CONFIG_FILE=str(secret.path))
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-all", max_retries=0)
    assert [m.id for m in client.models.list()] == ["sim-llama"]
    assert client.models.retrieve("sim-llama").id == "sim-llama"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    limited = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-none", max_retries=0)
    assert [m.id for m in limited.models.list()] == []
    with pytest.raises(openai.NotFoundError):
        limited.models.retrieve("sim-llama")


def test_usage_reset_time_is_rfc3339(gateway: Gateway) -> None:
    resets = dt.datetime.fromisoformat(_usage(gateway, KEY_A)["resets_at"])
    now = dt.datetime.now(dt.UTC)
    assert resets.tzinfo is not None and dt.timedelta(0) < resets - now <= dt.timedelta(days=1)
    assert (resets.hour, resets.minute, resets.second) == (0, 0, 0)


# 5. The usage chunk is found in any JSON spacing.


def test_usage_is_read_and_stripped_in_spaced_json(make_sim, make_gateway) -> None:
    sim = make_sim("--json-style", "spaced")
    gw = make_gateway(sim.url)
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY_A, max_retries=0)
    stream = client.chat.completions.create(
        model="sim-llama",
        messages=[{"role": "user", "content": "one two three four five"}],
        max_tokens=6,
        stream=True,
        extra_headers={"x-request-id": "spaced-1"},
    )
    # The README's snippet: every chunk has a choice (no usage chunk the client did not ask for).
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert text
    entry = gw.request_log("spaced-1")
    stats = sim.stats()
    assert entry["usage_exact"] is True
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (
        stats["prompt_tokens"],
        stats["completion_tokens"],
    )
    r = httpx.post(
        gw.url + "/v1/chat/completions",
        json={**CHAT, "max_tokens": 3},
        headers={**AUTH, "x-request-id": "spaced-2"},
    )
    assert r.status_code == 200
    assert gw.request_log("spaced-2")["completion_tokens"] == 3


def test_every_answer_carries_a_request_id(gateway: Gateway) -> None:
    for method, path in (("GET", "/health"), ("GET", "/ready"), ("GET", "/v1/models"),
                         ("GET", "/nope"), ("GET", "/v1/chat/completions"),
                         ("POST", "/v1/chat/completions")):  # fmt: skip
        r = httpx.request(method, gateway.url + path, headers={"x-request-id": "rid-7"})
        assert r.headers["x-request-id"] == "rid-7", path
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}, path
