"""Streams are streamed (not buffered), byte-identical to vLLM's, and always counted."""

from __future__ import annotations

import contextlib
import json
import re
import time

import httpx
from servers import KEY_A, Gateway, Sim, wait_until

CHAT = {"messages": [{"role": "user", "content": "stream please"}], "stream": True}
AUTH = {"authorization": f"Bearer {KEY_A}"}


def _stream_bytes(url: str, body: dict, headers: dict[str, str]) -> bytes:
    with httpx.stream("POST", url, json=body, headers=headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
        return b"".join(r.iter_raw())


def _normalized(data: bytes) -> bytes:
    return re.sub(rb'"created":\d+', b'"created":0', data)


def test_first_chunks_arrive_long_before_the_upstream_finishes(gateway: Gateway) -> None:
    body = {**CHAT, "max_tokens": 8}
    headers = {**AUTH, "x-sim-itl-ms": "150"}
    arrivals = []
    start = time.monotonic()
    with httpx.stream(
        "POST", gateway.url + "/v1/chat/completions", json=body, headers=headers
    ) as r:
        for _ in r.iter_raw():
            arrivals.append(time.monotonic() - start)
    # 8 tokens 150 ms apart: the upstream needs >= 1.05 s; the role chunk and first token
    # leave it at once and must not wait for the rest.
    assert arrivals[-1] >= 1.0
    assert arrivals[0] < arrivals[-1] - 0.8
    assert len(arrivals) >= 8


def test_bytes_equal_direct_ones(gateway: Gateway, sim: Sim) -> None:
    for path, body in [
        ("/v1/chat/completions", {**CHAT, "max_tokens": 5}),
        ("/v1/completions", {"prompt": "a b", "stream": True, "max_tokens": 5}),
        ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}),
        ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": False}}),
    ]:
        headers = {**AUTH, "x-request-id": "same-id-for-both"}
        direct = _stream_bytes(sim.url + path, body, headers)
        proxied = _stream_bytes(gateway.url + path, body, headers)
        assert _normalized(proxied) == _normalized(direct), path
        assert proxied.endswith(b"data: [DONE]\n\n")


def test_usage_chunk_injected_upstream_and_removed_for_client(gateway: Gateway, sim: Sim) -> None:
    sim.reset()
    body = {**CHAT, "max_tokens": 4}
    data = _stream_bytes(gateway.url + "/v1/chat/completions", body, AUTH)
    assert b'"usage"' not in data
    stats = sim.stats()
    # The simulator reported usage (it was asked for it) and the gateway counted it.
    assert stats["completion_tokens"] == 4


def test_cut_stream_counts_what_was_streamed(gateway: Gateway) -> None:
    headers = {**AUTH, "x-sim-fault": "cut", "x-sim-cut-after": "3", "x-request-id": "cut-1"}
    with httpx.stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        json={**CHAT, "max_tokens": 10},
        headers=headers,
    ) as r:
        data = b"".join(r.iter_raw())
    events = [e for e in data.split(b"\n\n") if e]
    # role chunk, three tokens, then the gateway's error event; no [DONE].
    assert len(events) == 5
    assert b'"code":"upstream_stream_broken"' in events[-1]
    entry = gateway.request_log("cut-1")
    assert entry["completion_tokens"] == 3
    assert entry["prompt_tokens"] > 0
    assert entry["usage_exact"] is False
    assert entry["error"] == "upstream_stream_broken"


def test_client_disconnect_cancels_the_upstream(gateway: Gateway, sim: Sim) -> None:
    sim.reset()
    headers = {**AUTH, "x-sim-itl-ms": "100", "x-request-id": "leaver-1"}
    with httpx.stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        json={**CHAT, "max_tokens": 50},
        headers=headers,
    ) as r:
        received = b""
        for part in r.iter_raw():
            received += part
            if received.count(b"\n\n") >= 3:
                break
    # The simulator sees its client (the gateway) go away long before 50 tokens.
    wait_until(lambda: sim.stats()["cancelled"] == 1, timeout=3)
    stats = sim.stats()
    assert stats["tokens_sent"] < 20
    entry = gateway.request_log("leaver-1")
    assert entry["client_disconnected"] is True
    assert entry["usage_exact"] is False
    assert 2 <= entry["completion_tokens"] <= stats["tokens_sent"]


def test_client_disconnect_while_waiting_for_a_whole_answer(gateway: Gateway, sim: Sim) -> None:
    sim.reset()
    headers = {**AUTH, "x-sim-ttft-ms": "3000", "x-request-id": "leaver-2"}
    body = {"messages": CHAT["messages"], "max_tokens": 5}
    with contextlib.suppress(httpx.ReadTimeout):
        httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=0.5)
    wait_until(lambda: sim.stats()["cancelled"] == 1, timeout=5)
    assert gateway.request_log("leaver-2")["client_disconnected"] is True


def test_only_allow_listed_headers_go_upstream(make_gateway, sim: Sim) -> None:
    """Headers upstream come from an allow-list: the client's credentials (in any of the
    headers clients use), cookies and claimed addresses never reach vLLM."""
    gw = make_gateway(
        sim.url, VLLM_API_KEY="internal-vllm-key", GATEWAY_FORWARD_HEADERS="x-sim-*,x-custom"
    )
    headers = {
        **AUTH,
        "x-request-id": "rid-123",
        "x-custom": "kept",
        "x-other": "dropped",
        "x-api-key": KEY_A,
        "api-key": KEY_A,
        "cookie": "session=secret",
        "x-forwarded-for": "198.51.100.7",
        "x-real-ip": "198.51.100.7",
        "forwarded": "for=198.51.100.7",
        "connection": "keep-alive, x-drop-me",
        "x-drop-me": "hop-by-hop",
        "te": "trailers",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    }
    r = httpx.post(
        gw.url + "/v1/completions", json={"prompt": "p", "max_tokens": 1}, headers=headers
    )
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "rid-123"
    assert r.json()["id"] == "cmpl-rid-123"  # vLLM builds its id from x-request-id
    seen = sim.stats()["last_headers"]
    assert seen["authorization"] == "Bearer internal-vllm-key"
    assert seen["x-request-id"] == "rid-123"
    assert seen["x-custom"] == "kept"
    assert seen["traceparent"] == headers["traceparent"]
    assert seen["content-type"] == "application/json"
    for name in ("x-other", "x-api-key", "api-key", "cookie", "x-forwarded-for", "x-real-ip",
                 "forwarded", "x-drop-me", "te"):  # fmt: skip
        assert name not in seen, name
    assert KEY_A not in json.dumps(seen)


def test_the_allow_list_cannot_name_credentials(make_gateway, sim: Sim) -> None:
    gw = make_gateway(sim.url, GATEWAY_FORWARD_HEADERS="x-*,cookie,authorization")
    headers = {**AUTH, "x-api-key": KEY_A, "cookie": "c=1", "x-fine": "yes"}
    r = httpx.post(gw.url + "/v1/completions", json={"prompt": "p", "max_tokens": 1},
                   headers=headers)  # fmt: skip
    assert r.status_code == 200
    seen = sim.stats()["last_headers"]
    assert seen["x-fine"] == "yes"
    assert "x-api-key" not in seen and "cookie" not in seen and "authorization" not in seen


def test_invalid_request_id_is_replaced(gateway: Gateway) -> None:
    r = httpx.post(
        gateway.url + "/v1/completions",
        json={"prompt": "p", "max_tokens": 1},
        headers={**AUTH, "x-request-id": "bad id with spaces"},
    )
    assert r.status_code == 200
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


def test_a_crlf_upstream_is_streamed_counted_and_stripped(make_sim, make_gateway) -> None:
    """The SSE spec allows \\r\\n line ends, and servers other than vLLM (or a proxy in
    front of it) write them: events are still found, so the stream is not held back to its
    end, and its usage chunk is read and removed."""
    sim = make_sim("--sse-newline", "crlf", "--itl-ms", "150")
    gw = make_gateway(sim.url)
    body = {**CHAT, "max_tokens": 8}
    arrivals, parts = [], []
    start = time.monotonic()
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, headers=AUTH) as r:
        for part in r.iter_raw():
            arrivals.append(time.monotonic() - start)
            parts.append(part)
    data = b"".join(parts)
    assert arrivals[0] < arrivals[-1] - 0.8, arrivals  # 8 tokens 150 ms apart
    assert data.endswith(b"data: [DONE]\r\n\r\n") and b"\n\n" not in data
    assert b'"usage"' not in data  # the gateway asked for it; the client did not
    usage = httpx.get(gw.url + "/v1/usage", headers=AUTH).json()
    assert usage["requests"] == 1 and usage["tokens_used"] == sim.stats()["prompt_tokens"] + 8


def test_a_slow_reader_gets_a_long_stream_whole(make_sim, make_gateway) -> None:
    """A client reading slower than the replica writes: the gateway holds the replica
    back (its reading pauses while the client's buffer is full) and resumes, and the
    client gets every event, in order, the usage last."""
    tokens = 20000  # about 4 MB of events, written by the simulator at once
    sim = make_sim("--max-model-len", "32768")
    gateway = make_gateway(sim.url)
    with httpx.stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        json={**CHAT, "max_tokens": tokens, "stream_options": {"include_usage": True}},
        headers=AUTH,
    ) as r:
        assert r.status_code == 200, r.read()
        parts = []
        for part in r.iter_raw(4096):
            parts.append(part)
            if len(parts) % 64 == 0:
                time.sleep(0.01)  # a slow reader
    data = b"".join(parts)
    events = [e for e in data.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    content = [e for e in events if b'"delta":{"content":' in e]  # (not the role chunk)
    assert len(content) == tokens, f"{len(content)} of {tokens} tokens"
    usage = json.loads(events[-2][len(b"data: ") :])["usage"]
    assert usage["completion_tokens"] == tokens
