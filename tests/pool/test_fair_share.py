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
