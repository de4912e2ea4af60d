"""The circuit breaker, against a real failing upstream and as a state machine."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from servers import KEY_A, wait_until

from tollgate_gateway.breaker import CircuitBreaker, State

BODY = {"prompt": "p", "max_tokens": 1}
AUTH = {"authorization": f"Bearer {KEY_A}"}


def test_opens_fails_fast_and_recovers_through_half_open(make_sim, make_gateway) -> None:
    sim = make_sim()
    gw = make_gateway(sim.url, BREAKER_FAILURE_THRESHOLD="2", BREAKER_OPEN_SECONDS="1")
    url = gw.url + "/v1/completions"
    failing = {**AUTH, "x-sim-fault": "error", "x-sim-error-status": "503"}
    assert httpx.post(url, json=BODY, headers=failing).status_code == 503
    assert httpx.post(url, json=BODY, headers=failing).status_code == 503
    seen = sim.stats()["requests"]

    # Open: refused at once, without touching the upstream, and not ready.
    r = httpx.post(url, json=BODY, headers=AUTH)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "upstream_circuit_open"
    assert 1 <= int(r.headers["retry-after"]) <= 1
    assert sim.stats()["requests"] == seen
    ready = httpx.get(gw.url + "/ready")
    assert ready.status_code == 503 and "circuit breaker open" in ready.json()["error"]["message"]
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY_A, max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model="sim-llama", prompt="p")
    assert info.value.status_code == 503

    # Half-open after the open time: a failing probe opens it again...
    time.sleep(1.1)
    assert httpx.post(url, json=BODY, headers=failing).status_code == 503
    assert httpx.post(url, json=BODY, headers=AUTH).json()["error"]["code"] == (
        "upstream_circuit_open"
    )
    # ...and a succeeding probe closes it.
    time.sleep(1.1)
    assert httpx.post(url, json=BODY, headers=AUTH).status_code == 200
    assert httpx.post(url, json=BODY, headers=AUTH).status_code == 200
    assert httpx.get(gw.url + "/ready").status_code == 200
    transitions = [(e["from"], e["to"]) for e in gw.lines() if e.get("event") == "breaker"]
    assert transitions == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]


def test_refused_upstream_opens_breaker_and_readiness_follows_health(
    make_sim, make_gateway
) -> None:
    sim = make_sim()
    gw = make_gateway(sim.url, BREAKER_FAILURE_THRESHOLD="1", BREAKER_OPEN_SECONDS="0.5")
    assert httpx.get(gw.url + "/ready").status_code == 200
    sim.configure(refuse_for_s=1.5)  # the simulator stops listening for 1.5 s
    r = httpx.post(gw.url + "/v1/completions", json=BODY, headers=AUTH)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unreachable"
    wait_until(lambda: httpx.get(gw.url + "/ready").status_code == 503, timeout=2)
    # The upstream comes back: health and a probe close everything again.
    wait_until(lambda: httpx.get(gw.url + "/ready").status_code == 200, timeout=5)
    assert httpx.post(gw.url + "/v1/completions", json=BODY, headers=AUTH).status_code == 200


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_state_machine() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=3, open_seconds=10, clock=clock)
    breaker.failure()
    breaker.failure()
    breaker.success()  # a success resets the count
    breaker.failure()
    breaker.failure()
    assert breaker.state is State.CLOSED and breaker.allow()
    breaker.failure()
    assert breaker.state is State.OPEN and not breaker.allow()
    assert breaker.retry_after() == 10
    clock.now = 10
    assert breaker.state is State.HALF_OPEN
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one probe at a time
    breaker.release()  # the probe's client left: another may probe
    assert breaker.allow()
    breaker.success()
    assert breaker.state is State.CLOSED
