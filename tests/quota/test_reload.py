"""The configuration document swapped the way Kubernetes updates a mounted Secret, under
three replicas: revocations and policy changes apply within a second, without a restart
and without failing in-flight requests; a broken document changes nothing."""

from __future__ import annotations

import threading
import time

import httpx
from configfile import MountedSecret, document
from servers import wait_until

ALPHA, BETA = "sk-alpha-1", "sk-beta-1"
POLICIES = {"open": {}, "tight": {"requestsPerMinute": 2}}
BODY = {"prompt": "x", "max_tokens": 2}


def _status(url: str, key: str) -> int:
    r = httpx.post(url + "/v1/completions", json=BODY, headers={"authorization": f"Bearer {key}"})
    return r.status_code


def test_revocation_and_policy_change_reach_every_replica(pg, make_sim, make_gateway, tmp_path):
    sim = make_sim()
    secret = MountedSecret(tmp_path / "config")
    both = {ALPHA: {"name": "alpha", "policy": "open"}, BETA: {"name": "beta", "policy": "open"}}
    secret.write(document(both, POLICIES))
    env = {**pg.env(), "GATEWAY_CONFIG_FILE": str(secret.path), "GATEWAY_API_KEYS": ""}
    gateways = [make_gateway(sim.url, **env) for _ in range(3)]
    assert all(_status(g.url, k) == 200 for g in gateways for k in (ALPHA, BETA))

    # A stream by alpha is in flight when alpha is revoked: it still completes.
    stream_result: list[bytes] = []

    def slow_stream() -> None:
        with httpx.stream(
            "POST",
            gateways[0].url + "/v1/completions",
            json={"prompt": "x", "max_tokens": 8, "stream": True},
            headers={"authorization": f"Bearer {ALPHA}", "x-sim-itl-ms": "150"},
        ) as r:
            stream_result.append(b"".join(r.iter_raw()))

    thread = threading.Thread(target=slow_stream)
    thread.start()
    time.sleep(0.2)
    revoked_at = time.monotonic()
    secret.write(document({BETA: {"name": "beta", "policy": "open"}}, POLICIES))
    wait_until(lambda: all(_status(g.url, ALPHA) == 401 for g in gateways), timeout=1.0)
    assert time.monotonic() - revoked_at < 1.0
    assert all(_status(g.url, BETA) == 200 for g in gateways)
    thread.join(5)
    assert stream_result and stream_result[0].endswith(b"data: [DONE]\n\n")

    # A policy change applies without a restart: beta may now send 2 requests a minute.
    secret.write(document({BETA: {"name": "beta", "policy": "tight"}}, POLICIES))
    wait_until(lambda: all(len(_loaded(g)) == 3 for g in gateways), timeout=1.0)
    gw = gateways[1]
    assert [_status(gw.url, BETA) for _ in range(3)][-1] == 429

    # A broken document is rejected; the last good one stays on every replica.
    secret.write(b'{"apiVersion": "tollgate.dev/v1alpha1", "keys": {"not-a-hash": {}}}')
    wait_until(
        lambda: all(
            any(e.get("event") == "config_reload" and e["ok"] is False for e in g.lines())
            for g in gateways
        ),
        timeout=1.0,
    )
    assert all(_status(g.url, ALPHA) == 401 for g in gateways)
    assert all(g.proc.poll() is None for g in gateways)
    # The rejected document is visible in the metrics until a valid one replaces it.
    assert all(_metric(g, "tollgate_config_last_reload_ok") == 0 for g in gateways)
    assert all(_metric(g, 'tollgate_config_reloads_total{result="failed"}') >= 1 for g in gateways)
    # All three still run the same last good document (the "tight" one).
    assert len({_loaded(g)[-1] for g in gateways}) == 1
    assert all(len(_loaded(g)) == 3 for g in gateways)


def _metric(gw, sample: str) -> float:
    for line in httpx.get(gw.url + "/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{sample} not in the scrape")


def _loaded(gw) -> list[str]:
    """Versions of the documents a gateway loaded, in order."""
    return [e["version"] for e in gw.lines() if e.get("event") == "config_reload" and e["ok"]]


def test_broken_document_at_start_stops_the_gateway(tmp_path) -> None:
    import subprocess

    from servers import BIN

    secret = MountedSecret(tmp_path / "config")
    secret.write(b"{not json")
    result = subprocess.run(
        [str(BIN / "tollgate-gateway")],
        env={"GATEWAY_CONFIG_FILE": str(secret.path), "PATH": "/usr/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "GATEWAY_CONFIG_FILE" in result.stderr and "config.json" in result.stderr
