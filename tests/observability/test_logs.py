"""Logs: one JSON line per request with the promised fields, and never a key, prompt or
completion — at any level, under any error."""

from __future__ import annotations

import signal

import httpx
from servers import KEY_A

FIELDS = {
    "ts", "level", "logger", "msg", "request_id", "key", "model", "route", "stream",
    "status", "upstream_status", "error", "prompt_tokens", "completion_tokens",
    "latency_ms", "ttft_ms", "overhead_ms", "client_disconnected",
}  # fmt: skip
SECRET_PROMPT = "prompt-marker-7f3a9c"
UPSTREAM_KEY = "internal-upstream-key-55e1"
WRONG_KEY = "sk-wrong-key-c0ffee"


def test_one_line_per_request_and_no_secrets(make_sim, make_gateway) -> None:
    sim = make_sim()
    gw = make_gateway(
        sim.url,
        LOG_LEVEL="DEBUG",
        VLLM_API_KEY=UPSTREAM_KEY,
        BREAKER_FAILURE_THRESHOLD="3",
        UPSTREAM_FIRST_BYTE_TIMEOUT_SECONDS="0.3",
    )
    url = gw.url + "/v1/chat/completions"
    good = {"authorization": f"Bearer {KEY_A}"}
    body = {"messages": [{"role": "user", "content": SECRET_PROMPT}], "max_tokens": 4}
    sent = [
        httpx.post(url, json=body, headers=good),
        httpx.post(url, json={**body, "stream": True}, headers=good),
        httpx.post(url, json=body, headers={"authorization": f"Bearer {WRONG_KEY}"}),
        httpx.post(url, content=f"{{{SECRET_PROMPT}", headers=good),  # invalid JSON
        httpx.post(url, json=body, headers={**good, "x-sim-fault": "error"}),
        httpx.post(url, json=body, headers={**good, "x-sim-fault": "stall"}),  # 504
        httpx.post(
            url,
            json={**body, "stream": True},
            headers={**good, "x-sim-fault": "cut", "x-sim-cut-after": "1"},
        ),
        httpx.post(url, json=body, headers=good),  # breaker open: 503
    ]
    assert [r.status_code for r in sent] == [200, 200, 401, 400, 500, 504, 200, 503]
    gw.signal(signal.SIGTERM)
    assert gw.wait_exit(15) == 0

    lines = gw.lines()
    requests = [e for e in lines if e.get("event") == "request"]
    assert len(requests) == len(sent)
    assert [e["request_id"] for e in requests] == [r.headers["x-request-id"] for r in sent]
    for entry in requests:
        assert set(entry) >= FIELDS, FIELDS - set(entry)
    assert [e["error"] for e in requests] == [
        None, None, "invalid_api_key", "invalid_json", None, "upstream_timeout",
        "upstream_stream_broken", "upstream_circuit_open",
    ]  # fmt: skip
    assert requests[0]["key"] == "team-a" and requests[0]["completion_tokens"] == 4
    # Start-up, breaker and drain events are there too.
    events = {e.get("event") for e in lines}
    assert {"startup", "breaker", "drain", "shutdown"} <= events

    text = gw.output()
    assert len(text.splitlines()) == len(lines)  # every line is JSON
    for secret in (KEY_A, WRONG_KEY, UPSTREAM_KEY, SECRET_PROMPT, "Hello from the tollgate"):
        assert secret not in text, secret
