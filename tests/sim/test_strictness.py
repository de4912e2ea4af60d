"""Issue #12: n / best_of, spaced JSON, what the simulator saw, keep-alive and body modes."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

import httpx
import openai
from servers import Sim, wait_until
from sim_helpers import post, raw_exchange, sse

CHAT = {"model": "sim-llama", "messages": [{"role": "user", "content": "one two three"}]}


def test_chat_n_streams_every_choice_interleaved_and_usage_sums_them(
    start: Callable[..., Sim],
) -> None:
    sim = start()
    body = {
        **CHAT,
        "n": 3,
        "max_tokens": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = sse(httpx.post(sim.url + "/v1/chat/completions", json=body).text)
    chunks = [data for _, data in events if data != "[DONE]"]
    # a role chunk per choice, then each engine step yields one chunk per choice
    indexes = [c["choices"][0]["index"] for c in chunks if c["choices"]]
    assert indexes == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    assert all(c["choices"][0]["delta"] == {"role": "assistant", "content": ""} for c in chunks[:3])
    finals = [c["choices"][0]["finish_reason"] for c in chunks[-4:-1]]
    assert finals == ["length"] * 3
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "total_tokens": 9, "completion_tokens": 6}
    assert events[-1] == (None, "[DONE]")


def test_chat_n_with_the_sdk_caps_each_choice(start: Callable[..., Sim]) -> None:
    sim = start()
    client = openai.OpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0)
    answer = client.chat.completions.create(
        model="sim-llama", messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=3
    )
    assert [c.index for c in answer.choices] == [0, 1]
    assert all(c.message.content == "Hello from the" for c in answer.choices)
    assert answer.usage is not None and answer.usage.completion_tokens == 6
    assert sim.stats()["max_n"] == 2 and sim.stats()["max_max_tokens"] == 3


def test_completions_batch_n_and_best_of(start: Callable[..., Sim]) -> None:
    sim = start()
    body = {"model": "sim-llama", "prompt": ["a b", "c"], "n": 2, "best_of": 3, "max_tokens": 2}
    answer = httpx.post(sim.url + "/v1/completions", json=body).json()
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2, 3]
    # current vLLM ignores best_of: usage counts the n returned choices of each prompt
    assert answer["usage"]["prompt_tokens"] == 3
    assert answer["usage"]["completion_tokens"] == 8
    sim.configure(best_of="bill")  # as OpenAI bills it: max(n, best_of) sequences
    answer = httpx.post(sim.url + "/v1/completions", json=body).json()
    assert len(answer["choices"]) == 4
    assert answer["usage"]["completion_tokens"] == 12
    assert sim.stats()["max_best_of"] == 3


def test_spaced_json_style_in_bodies_and_events(start: Callable[..., Sim]) -> None:
    sim = start("--json-style", "spaced")
    body = httpx.post(sim.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 1}).text
    assert body.startswith('{"id": "chatcmpl-') and '"object": "chat.completion", ' in body
    assert json.loads(body)["usage"]["completion_tokens"] == 1
    stream = httpx.post(
        sim.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 1, "stream": True}
    ).text
    first = stream.split("\n\n")[0]
    assert first.startswith('data: {"id": "chatcmpl-') and '"choices": [{"index": 0' in first
    compact = httpx.post(
        sim.url + "/v1/chat/completions",
        json={**CHAT, "max_tokens": 1},
        headers={"x-sim-json-style": "compact"},
    ).text
    assert compact.startswith('{"id":"chatcmpl-')


def test_stats_count_routes_headers_and_body_bytes(start: Callable[..., Sim]) -> None:
    sim = start()
    payload = json.dumps({**CHAT, "max_tokens": 1}).encode()
    for i in range(3):
        httpx.post(
            sim.url + "/v1/chat/completions",
            content=payload,
            headers={"content-type": "application/json", "x-trace": str(i)},
        )
    httpx.get(sim.url + "/v1/models")
    stats = sim.stats()
    assert stats["routes"] == {"POST /v1/chat/completions": 3, "GET /v1/models": 1}
    assert stats["requests"] == 3  # /v1/models polls are not inference requests
    assert stats["body_bytes"] == 3 * len(payload)
    assert stats["last_headers"]["x-trace"] == "2"
    traces = [r["headers"].get("x-trace") for r in stats["recent"]]
    assert traces == ["0", "1", "2", None]
    assert stats["recent"][-1]["path"] == "/v1/models"


def test_prompt_tokens_of_abandoned_requests_are_counted(start: Callable[..., Sim]) -> None:
    sim = start("--ttft-ms", "3000")
    words = " ".join(["word"] * 7)
    body = {"model": "sim-llama", "messages": [{"role": "user", "content": words}]}
    for stream in (True, False):
        with socket.create_connection(("127.0.0.1", int(sim.url.rsplit(":", 1)[1]))) as sock:
            sock.sendall(post("/v1/chat/completions", {**body, "stream": stream}))
            wait_until(lambda: sim.stats()["prompt_tokens_processed"] > 0, timeout=10)
    # both left before the first token: nothing reported, everything processed
    stats = wait_until(lambda: (s := sim.stats())["cancelled"] == 2 and s, timeout=10)
    assert stats["prompt_tokens_processed"] == 14
    assert stats["prompt_tokens"] == 0 and stats["completed"] == 0


def test_keepalive_timeout_closes_idle_connections(start: Callable[..., Sim]) -> None:
    sim = start("--keepalive-timeout-s", "0.5")
    port = int(sim.url.rsplit(":", 1)[1])
    head, sock = raw_exchange(port, post("/v1/completions", {"prompt": "x", "max_tokens": 1}))
    with sock:
        assert head.startswith(b"HTTP/1.1 200 OK")
        sock.settimeout(10)
        began = time.monotonic()
        rest = b""
        while piece := sock.recv(65536):  # the server closes: recv returns b""
            rest += piece
        assert 0.3 < time.monotonic() - began < 8
    assert wait_until(lambda: sim.stats()["idle_closed"] == 1)
    # a connection in use is not closed: requests 0.2 s apart share one connection
    before = sim.stats()["connections"]  # each stats() call is a connection of its own
    with httpx.Client(base_url=sim.url) as client:
        for _ in range(3):
            assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).is_success
            time.sleep(0.2)
    assert sim.stats()["connections"] == before + 2


def test_chunked_body_mode(start: Callable[..., Sim]) -> None:
    sim = start("--body-mode", "chunked")
    port = int(sim.url.rsplit(":", 1)[1])
    head, sock = raw_exchange(port, post("/v1/completions", {"prompt": "x", "max_tokens": 2}))
    sock.close()
    assert b"transfer-encoding: chunked\r\n" in head.lower()
    assert b"content-length" not in head.split(b"\r\n\r\n")[0].lower()
    answer = httpx.post(sim.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert answer.json()["choices"][0]["text"] == "Hello from"
    plain = httpx.post(
        sim.url + "/v1/completions",
        json={"prompt": "x", "max_tokens": 2},
        headers={"x-sim-body-mode": "length"},
    )
    assert plain.headers["content-length"] == str(len(plain.content))


def test_vllm_errors(start: Callable[..., Sim]) -> None:
    sim = start()
    missing = httpx.post(sim.url + "/v1/chat/completions", json={**CHAT, "model": "nope"})
    assert missing.status_code == 404
    assert missing.json() == {
        "error": {
            "message": "The model `nope` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }
    zero = httpx.post(sim.url + "/v1/chat/completions", json={**CHAT, "n": 0})
    assert zero.status_code == 400 and zero.json()["error"]["param"] == "n"
    long = httpx.post(sim.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 5000})
    assert long.status_code == 400 and "maximum context length is 4096" in long.text
    not_json = httpx.post(sim.url + "/v1/chat/completions", content=b"{}")
    assert not_json.status_code == 400 and "application/json" in not_json.text
    assert httpx.get(sim.url + "/v1/nothing").json() == {"detail": "Not Found"}
    assert httpx.get(sim.url + "/v1/chat/completions").status_code == 405
    # vLLM has no GET /v1/models/{id}
    assert httpx.get(sim.url + "/v1/models/sim-llama").status_code == 404


def test_paced_stream_of_n_choices_and_the_client_leaving(start: Callable[..., Sim]) -> None:
    sim = start("--itl-ms", "200")
    body = {**CHAT, "n": 2, "max_tokens": 50, "stream": True}
    with httpx.stream("POST", sim.url + "/v1/chat/completions", json=body) as answer:
        chunks = answer.iter_lines()
        seen = [line for line, _ in zip(chunks, range(8), strict=False) if line]
    # role chunks for both choices, then both choices' first tokens
    assert [json.loads(line[6:])["choices"][0]["index"] for line in seen] == [0, 1, 0, 1]
    stats = wait_until(lambda: (s := sim.stats())["cancelled"] == 1 and s, timeout=10)
    assert stats["completed"] == 0 and stats["active"] == 0
    assert 2 <= stats["tokens_sent"] < 100 and stats["running"] == 0


def test_continuous_usage_stats(start: Callable[..., Sim]) -> None:
    sim = start()
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = {**CHAT, "max_tokens": 2, "stream": True, "stream_options": options}
    events = sse(httpx.post(sim.url + "/v1/chat/completions", json=body).text)
    usages = [data["usage"]["completion_tokens"] for _, data in events if data != "[DONE]"]
    assert usages == [0, 1, 2, 2]
    text = httpx.post(
        sim.url + "/v1/completions",
        json={"prompt": "a", "max_tokens": 2, "stream": True, "stream_options": options},
    ).text
    assert [d["usage"]["completion_tokens"] for _, d in sse(text) if d != "[DONE]"] == [1, 2, 2]


def test_spaced_style_applies_to_named_events(start: Callable[..., Sim]) -> None:
    sim = start("--json-style", "spaced")
    body = {
        "model": "sim-llama",
        "max_tokens": 1,
        "stream": True,
        "messages": [{"role": "user", "content": "x"}],
    }
    text = httpx.post(sim.url + "/v1/messages", json=body).text
    assert 'event: content_block_delta\ndata: {"type": "content_block_delta", ' in text
    assert [name for name, _ in sse(text)][-1] == "message_stop"
