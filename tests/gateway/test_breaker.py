"""The circuit breaker, against a real failing upstream and as a state machine."""

from __future__ import annotations

import httpx
import openai
import pytest
from servers import KEY_A

from tollgate_gateway.breaker import CircuitBreaker, State

BODY = {"prompt": "p", "max_tokens": 1}
AUTH = {"authorization": f"Bearer {KEY_A}"}


def _breaker_state(gw_url: str, state: str) -> bool:
    """Whether the (only) upstream's breaker is in `state`; a scrape also moves an open
    breaker whose time is up to half-open, as a request would."""
    lines = httpx.get(gw_url + "/metrics").text.splitlines()
    wanted = f'state="{state}"'
    return any(
        line.startswith("tollgate_circuit_breaker_state{")
        and wanted in line
        and line.endswith(" 1.0")
        for line in lines
    )


def test_opens_fails_fast_and_recovers_through_half_open(make_sim, make_gateway) -> None:
    sim = make_sim()
    # Long enough that the checks below fit in the open time on a busy machine; the wait
    # for half-open polls for that state, so the test never races the clock.
    gw = make_gateway(sim.url, BREAKER_FAILURE_THRESHOLD="2", BREAKER_OPEN_SECONDS="3")
    url = gw.url + "/v1/completions"
    failing = {**AUTH, "x-sim-fault": "error", "x-sim-error-status": "503"}
    assert httpx.post(url, json=BODY, headers=failing).status_code == 503
    assert httpx.post(url, json=BODY, headers=failing).status_code == 503
    seen = sim.stats()["requests"]

    # Open: refused at once, without touching the upstream. Readiness stays up (the
    # gateway answers, with a reason) and reports the problem.
    r = httpx.post(url, json=BODY, headers=AUTH)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "upstream_circuit_open"
    assert 1 <= int(r.headers["retry-after"]) <= 3
    assert sim.stats()["requests"] == seen
    ready = httpx.get(gw.url + "/ready")
    assert ready.status_code == 200
    assert any("circuit breaker open" in p for p in ready.json()["upstream_problems"])
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY_A, max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model="sim-llama", prompt="p")
    assert info.value.status_code == 503

    # Half-open after the open time: a failing probe opens it again...
    gw.wait_for(lambda: _breaker_state(gw.url, "half_open"), "the breaker to turn half-open")
    assert httpx.post(url, json=BODY, headers=failing).status_code == 503
    assert httpx.post(url, json=BODY, headers=AUTH).json()["error"]["code"] == (
        "upstream_circuit_open"
    )
    # ...and a succeeding probe closes it.
    gw.wait_for(lambda: _breaker_state(gw.url, "half_open"), "the breaker to turn half-open")
    assert httpx.post(url, json=BODY, headers=AUTH).status_code == 200
    assert httpx.post(url, json=BODY, headers=AUTH).status_code == 200
    assert httpx.get(gw.url + "/ready").json()["upstream_problems"] == []
    transitions = [(e["from"], e["to"]) for e in gw.lines() if e.get("event") == "breaker"]
    assert transitions == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]


def test_refused_upstream_is_unreachable_and_opens_the_breaker(make_sim, make_gateway) -> None:
    sim = make_sim()
    # No health poll during the test: the request, not the poll, must find the refusal.
    gw = make_gateway(
        sim.url,
        BREAKER_FAILURE_THRESHOLD="1",
        BREAKER_OPEN_SECONDS="60",
        UPSTREAM_HEALTH_INTERVAL_SECONDS="600",
    )
    sim.configure(refuse_for_s=600)  # the simulator stops listening
    r = httpx.post(gw.url + "/v1/completions", json=BODY, headers=AUTH)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unreachable"
    assert "127.0.0.1" not in r.text  # the upstream's address stays in the logs
    r = httpx.post(gw.url + "/v1/completions", json=BODY, headers=AUTH)
    assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_circuit_open"


def test_health_poll_takes_a_down_upstream_out_and_back(make_sim, make_gateway) -> None:
    sim = make_sim()
    gw = make_gateway(sim.url, UPSTREAM_HEALTH_INTERVAL_SECONDS="0.2")
    sim.configure(refuse_for_s=3)
    gw.wait_for(
        lambda: (
            httpx.post(gw.url + "/v1/completions", json=BODY, headers=AUTH).json()["error"]["code"]
            == "no_healthy_upstream"
        ),
        "requests to be refused with no_healthy_upstream while the upstream is down",
    )
    assert httpx.get(gw.url + "/ready").status_code == 200  # the gateway itself is fine
    gw.wait_for(
        lambda: httpx.post(gw.url + "/v1/completions", json=BODY, headers=AUTH).status_code == 200,
        "the upstream to be healthy again",
    )


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
