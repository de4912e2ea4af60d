"""SIGTERM: not ready at once, in-flight streams finish, exit status 0."""

from __future__ import annotations

import signal
import threading
import time

import httpx
from servers import KEY_A, wait_until

BODY = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 10}
HEADERS = {"authorization": f"Bearer {KEY_A}", "x-sim-itl-ms": "150"}


def test_sigterm_drains_in_flight_streams(make_sim, make_gateway) -> None:
    sim = make_sim()
    gw = make_gateway(sim.url, GATEWAY_SHUTDOWN_DELAY_SECONDS="0.6", GATEWAY_DRAIN_SECONDS="10")
    results: list[bytes] = []
    started = threading.Barrier(6)

    def stream() -> None:
        with httpx.stream(
            "POST", gw.url + "/v1/chat/completions", json=BODY, headers=HEADERS, timeout=10
        ) as r:
            data = b""
            for part in r.iter_raw():
                if not data:
                    started.wait()
                data += part
            results.append(data)

    threads = [threading.Thread(target=stream) for _ in range(5)]
    for t in threads:
        t.start()
    started.wait()  # every stream has its first bytes
    gw.signal(signal.SIGTERM)
    # During the shutdown delay the gateway still answers, but is not ready.
    ready = wait_until(lambda: httpx.get(gw.url + "/ready").status_code == 503, timeout=0.5)
    assert ready
    assert httpx.get(gw.url + "/health").status_code == 200
    for t in threads:
        t.join(15)
    assert gw.wait_exit(15) == 0
    assert len(results) == 5
    assert all(r.endswith(b"data: [DONE]\n\n") and r.count(b"\n\n") == 12 for r in results)
    # After the drain nothing listens any more.
    time.sleep(0.1)
    try:
        httpx.get(gw.url + "/health", timeout=1)
        raise AssertionError("the gateway still answers after exiting")
    except httpx.TransportError:
        pass
    entries = gw.requests()
    assert len(entries) == 5 and all(e["completion_tokens"] == 10 for e in entries)
    events = [e.get("event") for e in gw.lines()]
    assert events.index("drain") < events.index("shutdown")
