"""GATEWAY_UPSTREAM_MAX_IN_FLIGHT: when every replica is full, requests wait in the
gateway in per-key queues served in turn, so a heavy key's backlog does not become a
light key's latency; sheddable keys are refused instead of queued; a wait has a
deadline."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from configfile import MountedSecret, document
from servers import KEY_A, KEY_B, scaled

SHED = "sk-test-batch"


def _post(url: str, key: str, **headers: str) -> httpx.Response:
    return httpx.post(
        url + "/v1/completions",
        json={"prompt": "hi", "max_tokens": 2},
        headers={"authorization": f"Bearer {key}", **headers},
        timeout=scaled(60),
    )


def _waiting(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("tollgate_queue_waiting "):
            return float(line.split()[1])
    return -1.0


def _running(sim_url: str) -> float:
    for line in httpx.get(sim_url + "/metrics").text.splitlines():
        if line.startswith("vllm:num_requests_running{"):
            return float(line.rsplit(" ", 1)[1])
    return -1.0


def test_a_light_key_is_served_in_turn_not_after_a_heavy_keys_backlog(
    make_sim, make_gateway, tmp_path
) -> None:
    sim = make_sim("--ttft-ms", "300")
    secret = MountedSecret(tmp_path / "config")
    secret.write(
        document(
            {
                KEY_A: {"name": "heavy"},
                KEY_B: {"name": "light"},
                SHED: {"name": "batch", "policy": "sheddable"},
            },
            policies={"sheddable": {"priority": -1}},
        )
    )
    gw = make_gateway(
        sim.url,
        GATEWAY_CONFIG_FILE=str(secret.path),
        GATEWAY_UPSTREAM_MAX_IN_FLIGHT="2",
        GATEWAY_API_KEYS="",
    )
    finished: list[str] = []
    lock = threading.Lock()

    def send(key: str, name: str) -> int:
        status = _post(gw.url, key).status_code
        with lock:
            finished.append(name)
        return status

    with ThreadPoolExecutor(16) as pool:
        heavy = [pool.submit(send, KEY_A, "heavy") for _ in range(12)]
        gw.wait_for(lambda: _waiting(gw.url) >= 8, "the heavy key's backlog queued")
        shed = _post(gw.url, SHED)  # saturated: refused at once, not queued
        light = [pool.submit(send, KEY_B, "light") for _ in range(2)]
        codes = [f.result() for f in heavy + light]
    assert codes == [200] * 14
    assert shed.status_code == 503 and shed.json()["error"]["code"] == "gateway_overloaded"
    assert "sheddable" in shed.json()["error"]["message"] and "retry-after" in shed.headers
    # First come, first served would finish both light requests last (after 12 heavy).
    last_light = max(i for i, name in enumerate(finished) if name == "light")
    assert finished[last_light + 1 :].count("heavy") >= 4, finished


def test_a_request_that_waits_too_long_gets_a_503(make_sim, make_gateway) -> None:
    sim = make_sim("--ttft-ms", "3000")
    gw = make_gateway(
        sim.url, GATEWAY_UPSTREAM_MAX_IN_FLIGHT="1", GATEWAY_QUEUE_TIMEOUT_SECONDS="0.5"
    )
    with ThreadPoolExecutor(1) as pool:
        holder = pool.submit(_post, gw.url, KEY_A)
        gw.wait_for(lambda: sim.stats()["requests"] == 1, "the one place taken")
        started = time.monotonic()
        waited = _post(gw.url, KEY_B)
        elapsed = time.monotonic() - started
        assert holder.result().status_code == 200
    assert waited.status_code == 503 and waited.headers["retry-after"] == "1"
    assert "waited 0.5 s" in waited.json()["error"]["message"]
    assert 0.5 <= elapsed < scaled(3)
    assert sim.stats()["requests"] == 1  # it never reached the replica


def test_a_recently_active_light_key_finds_its_place_held(make_sim, make_gateway, tmp_path) -> None:
    """vLLM never hands a running request's place back, so a light request that arrives
    just after the heavy key took the last place would wait for a whole generation. A key
    active in the last few seconds has its places (up to its recent peak) held back."""
    sim = make_sim("--ttft-ms", "4000")
    secret = MountedSecret(tmp_path / "config")
    secret.write(document({KEY_A: {"name": "heavy"}, KEY_B: {"name": "light"}}))
    gw = make_gateway(
        sim.url,
        GATEWAY_CONFIG_FILE=str(secret.path),
        GATEWAY_UPSTREAM_MAX_IN_FLIGHT="4",
        GATEWAY_FORWARD_HEADERS="x-sim-ttft-ms",
        GATEWAY_API_KEYS="",
    )
    fast = {"x-sim-ttft-ms": "10"}
    assert _post(gw.url, KEY_B, **fast).status_code == 200  # the light key's recent peak: 1
    finished: list[str] = []

    def heavy() -> int:
        status = _post(gw.url, KEY_A).status_code
        finished.append("heavy")
        return status

    with ThreadPoolExecutor(5) as pool:
        heavies = [pool.submit(heavy) for _ in range(5)]
        gw.wait_for(
            lambda: _running(sim.url) + _waiting(gw.url) == 5 and _waiting(gw.url) > 0,
            "the heavy key's requests on the replica or queued",
        )
        # First come, first served would have given the heavy key all 4 places.
        assert (_running(sim.url), _waiting(gw.url)) == (3, 2)
        light = _post(gw.url, KEY_B, **fast)
        finished.append("light")
        codes = [f.result() for f in heavies]
    assert light.status_code == 200 and codes == [200] * 5
    assert finished[0] == "light", finished  # it did not wait for a heavy one to end


def test_with_every_breaker_open_a_request_is_refused_not_queued(make_sim, make_gateway) -> None:
    """The queue waits for a place on a full replica, not for a broken one to heal: with
    the breaker open, a request is refused at once, as without the queue."""
    sim = make_sim()
    gw = make_gateway(
        sim.url,
        GATEWAY_UPSTREAM_MAX_IN_FLIGHT="2",
        GATEWAY_QUEUE_TIMEOUT_SECONDS="30",
        BREAKER_FAILURE_THRESHOLD="1",
        BREAKER_OPEN_SECONDS="60",
    )
    assert _post(gw.url, KEY_A, **{"x-sim-fault": "error"}).status_code == 500
    started = time.monotonic()
    refused = _post(gw.url, KEY_A)
    assert refused.status_code == 503, refused.text
    assert "circuit breaker" in refused.json()["error"]["message"]
    assert time.monotonic() - started < scaled(10)  # not the queue's 30 s
    assert _waiting(gw.url) == 0
