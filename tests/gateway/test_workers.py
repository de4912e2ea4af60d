"""GATEWAY_WORKERS: one pod's gateway in several processes on one port. The workers share
the per-IP and per-key limits (a client's connections land on any of them), the pod's
metrics are one view of them all, a dead worker is replaced with its counts cleared, and
SIGTERM drains every worker without losing usage."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
from servers import BIN, KEY_A, Gateway, Process, free_port, scaled, wait_until

from tollgate_gateway.settings import load_settings

BODY = {"prompt": "one two", "max_tokens": 3}


def _post(url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    """On a connection of its own, so the kernel may give it to either worker."""
    return httpx.post(
        url + "/v1/completions",
        json=BODY,
        headers={"authorization": f"Bearer {KEY_A}", "connection": "close", **(headers or {})},
        timeout=scaled(10),
    )


def _metrics(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=scaled(5)).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            values[series] = float(value)
    return values


def _total(metrics: dict[str, float], name: str) -> float:
    return sum(v for series, v in metrics.items() if series.split("{")[0] == name)


def _workers(make_gateway, sim_url: str, **env: str) -> tuple[Gateway, int]:
    port = free_port()
    gateway = make_gateway(sim_url, GATEWAY_WORKERS="2", GATEWAY_METRICS_PORT=str(port), **env)
    gateway.wait_for(
        lambda: (
            _metrics(port).get("tollgate_workers") == 2
            and _metrics(port).get("tollgate_config_keys") == 2
        ),
        "both workers up and answering the supervisor's scrape",
    )
    return gateway, port


def _served_by(gateway: Gateway, count: int) -> set[int]:
    lines = gateway.wait_for(
        lambda: (found := gateway.requests()) and len(found) >= count and found,
        f"{count} request log lines",
    )
    return {line["worker"] for line in lines}


def test_workers_share_the_port_and_publish_one_metrics_view(make_sim, make_gateway) -> None:
    sim = make_sim()
    gateway, port = _workers(make_gateway, sim.url)
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: _post(gateway.url).status_code, range(48)))
    assert codes == [200] * 48
    assert _served_by(gateway, 48) == {0, 1}
    metrics = wait_until(
        lambda: (m := _metrics(port)) and _total(m, "tollgate_requests_total") == 48 and m,
        what="the pod's request count, summed over the workers",
    )
    assert metrics['tollgate_upstream_up{upstream="' + sim.url.removeprefix("http://") + '"}'] == 1
    assert metrics["tollgate_worker_restarts_total"] == 0
    # The client port serves no metrics; the supervisor's port serves nothing else.
    assert httpx.get(gateway.url + "/metrics").status_code == 404
    assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 404


def test_the_per_ip_burst_is_the_pods_not_each_workers(make_sim, make_gateway) -> None:
    sim = make_sim()
    gateway, _ = _workers(
        make_gateway, sim.url, GATEWAY_IP_RATE_PER_SECOND="0.01", GATEWAY_IP_BURST="10"
    )
    codes = [_post(gateway.url).status_code for _ in range(30)]
    assert sorted(codes) == [200] * 10 + [429] * 20, codes
    assert _served_by(gateway, 30) == {0, 1}  # the refusals came from both workers


def test_a_keys_concurrency_limit_is_the_pods(make_sim, make_gateway) -> None:
    sim = make_sim()
    gateway, _ = _workers(make_gateway, sim.url, GATEWAY_DEFAULT_MAX_CONCURRENT_REQUESTS="2")
    slow = {"x-sim-ttft-ms": "1500"}
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: _post(gateway.url, slow).status_code, range(8)))
    assert sorted(codes) == [200] * 2 + [429] * 6, codes
    assert _served_by(gateway, 8) == {0, 1}
    # Both slots are free again once the two are done.
    assert [_post(gateway.url).status_code for _ in range(2)] == [200, 200]


def test_a_keys_requests_per_minute_are_the_pods(make_sim, make_gateway) -> None:
    """The workers share the SQLite file as replicas share Postgres: near the limit each
    admission is confirmed against the file, so two workers do not admit twice the limit
    (each alone would admit 10: 20 in all). What one admitted before it came near (80 %
    of the limit over two workers: 4) is what the other cannot see (quota.py)."""
    sim = make_sim()
    gateway, _ = _workers(make_gateway, sim.url, GATEWAY_DEFAULT_REQUESTS_PER_MINUTE="10")
    codes = [_post(gateway.url).status_code for _ in range(20)]
    shown = "".join(str(c)[0] for c in codes)
    assert codes[:10] == [200] * 10 and set(codes) == {200, 429}, shown
    assert codes.count(200) <= 10 + 4, shown
    assert _served_by(gateway, 20) == {0, 1}


def test_a_killed_worker_is_replaced_and_its_counts_cleared(make_sim, make_gateway) -> None:
    sim = make_sim()
    gateway, port = _workers(make_gateway, sim.url, GATEWAY_DEFAULT_MAX_CONCURRENT_REQUESTS="1")
    # A long stream holds the key's one slot, on whichever worker took the connection.
    body = json.dumps({**BODY, "max_tokens": 500, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=scaled(10)) as conn:
        conn.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
            + f"authorization: Bearer {KEY_A}\r\nx-sim-itl-ms: 50\r\n".encode()
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert conn.recv(65536).startswith(b"HTTP/1.1 200")
        assert _post(gateway.url).status_code == 429  # the slot is taken
        local = conn.getsockname()[1]
        (holder,) = [
            child
            for child in psutil.Process(gateway.proc.pid).children()
            if any(c.raddr and c.raddr.port == local for c in child.net_connections("tcp"))
        ]
        holder.kill()
        holder.wait(scaled(10))
    gateway.wait_for(
        lambda: _metrics(port).get("tollgate_worker_restarts_total") == 1,
        "the dead worker replaced",
    )
    # Its request died with it; the slot it held must not stay taken in the pod's count.
    assert any(line.get("event") == "worker_died" for line in gateway.lines())
    gateway.wait_for(lambda: _metrics(port).get("tollgate_workers") == 2, "the new worker running")
    codes = [_post(gateway.url).status_code for _ in range(6)]
    assert codes == [200] * 6, codes


def test_sigterm_drains_every_worker_and_keeps_all_usage(make_sim, tmp_path: Path) -> None:
    sim = make_sim()
    db = tmp_path / "usage.db"
    gateway = Gateway(
        tmp_path,
        sim.url,
        {
            "GATEWAY_WORKERS": "2",
            "GATEWAY_METRICS_PORT": str(free_port()),
            "DATABASE_URL": f"sqlite:///{db}",
            # Nothing reaches the store before the drain but what the drain flushes.
            "QUOTA_FLUSH_INTERVAL_SECONDS": "3600",
        },
    )
    try:
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda _: _post(gateway.url), range(24)))
        assert [r.status_code for r in responses] == [200] * 24
        tokens = sum(r.json()["usage"]["total_tokens"] for r in responses)
        assert _served_by(gateway, 24) == {0, 1}
        workers = psutil.Process(gateway.proc.pid).children()
        assert len(workers) == 2
        gateway.signal(signal.SIGTERM)
        assert gateway.wait_exit() == 0, gateway.describe()
        assert not [w for w in workers if w.is_running() and w.status() != "zombie"]
    finally:
        gateway.stop()
    stopped = [line for line in gateway.lines() if line.get("event") == "worker_stopped"]
    assert sorted((line["worker"], line["status"]) for line in stopped) == [(0, 0), (1, 0)]
    with sqlite3.connect(db) as conn:
        stored = conn.execute(
            "SELECT SUM(prompt_tokens + completion_tokens), SUM(requests) FROM tollgate_usage"
        ).fetchone()
    assert stored == (tokens, 24)


def test_a_worker_that_cannot_start_stops_the_pod(tmp_path: Path) -> None:
    """A bad configuration document fails every worker the same way: the pod exits with
    the configuration status at once instead of restarting them in a loop."""
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    process = Process(
        [str(BIN / "tollgate-gateway")],
        {
            "GATEWAY_WORKERS": "2",
            "GATEWAY_PORT": str(free_port()),
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_METRICS_PORT": str(free_port()),
            "GATEWAY_CONFIG_FILE": str(bad),
            "DATABASE_URL": f"sqlite:///{tmp_path}/u.db",
        },
        tmp_path / "gw.log",
    )
    try:
        assert process.wait_exit() == 2, process.describe()
    finally:
        process.stop()
    assert "worker_died" not in process.output()
    assert "tollgate-gateway:" in process.output()  # the worker said why


def test_workers_without_a_metrics_port_is_a_clear_error() -> None:
    env = {**os.environ, "GATEWAY_WORKERS": "2"}
    env.pop("GATEWAY_METRICS_PORT", None)
    done = subprocess.run(
        [str(BIN / "tollgate-gateway")], env=env, capture_output=True, text=True, timeout=scaled(20)
    )
    assert done.returncode == 2
    assert "GATEWAY_WORKERS=2 needs GATEWAY_METRICS_PORT" in done.stderr


def test_auto_is_the_cpus_this_process_may_use() -> None:
    settings = load_settings(gateway_workers="auto", gateway_metrics_port=9000)
    assert 1 <= settings.gateway_workers <= len(os.sched_getaffinity(0))
