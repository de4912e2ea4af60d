"""Two operator replicas never race (a coordination.k8s.io Lease), the operator's /metrics,
and a liveness probe that fails when the API server has been unreachable."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from harness import Kube, Operator, TcpProxy, get_json, path, scrape, wait_until
from k8s_emulator import EmulatorThread
from servers import free_port, scaled
from test_operator_reconcile import NS, apikey, gateway, key_names

LEASE = ("tollgate", "tollgate-operator")
# Short leases so the fail-over is quick, with a renew deadline far enough below the lease
# duration that a slow machine does not lose leadership by mere slowness.
FAST_LEASE = {
    "TOLLGATE_LEASE_DURATION": "8",
    "TOLLGATE_LEASE_RENEW_DEADLINE": "6",
    "TOLLGATE_LEASE_RETRY_PERIOD": "0.5",
}


def lease(cluster: EmulatorThread) -> dict[str, Any]:
    return cluster.objects("coordination.k8s.io", "leases").get(LEASE) or {}


def holder(cluster: EmulatorThread) -> str:
    return str((lease(cluster).get("spec") or {}).get("holderIdentity") or "")


def replica(start: Callable[..., Operator], pod: str, **env: str) -> tuple[Operator, str, str]:
    """An operator named `pod`, with its metrics and liveness URLs."""
    metrics = f"http://127.0.0.1:{free_port()}/metrics"
    health = f"http://127.0.0.1:{free_port()}/healthz"
    op = start(POD_NAME=pod, TOLLGATE_METRICS=metrics, TOLLGATE_LIVENESS=health, **env)
    return op, metrics, health


def sample(metrics: str, name: str) -> float | None:
    return scrape(metrics).get(name)


WRITES = {"POST", "PUT", "PATCH", "DELETE"}


def writes(requests: list[Any]) -> list[Any]:
    return [r for r in requests if r.method.value in WRITES]


def test_lease_update_with_a_stale_resource_version_is_a_conflict(kube: Kube) -> None:
    """The emulator enforces optimistic concurrency on Leases as the API server does."""
    created = kube.apply(
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "x", "namespace": "tollgate"},
            "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15},
        }
    )
    url = path("Lease", "tollgate", "x")
    first = {**created, "spec": {**created["spec"], "holderIdentity": "b"}}
    assert kube.http.put(url, json=first).status_code == 200
    stale = {**created, "spec": {**created["spec"], "holderIdentity": "c"}}
    response = kube.http.put(url, json=stale)
    assert response.status_code == 409, response.text
    assert response.json()["reason"] == "Conflict"
    assert kube.get("Lease", "tollgate", "x")["spec"]["holderIdentity"] == "b"


def test_two_replicas_one_leads_and_the_other_takes_over(
    cluster: EmulatorThread, kube: Kube, start_operator: Callable[..., Operator]
) -> None:
    a, a_metrics, _ = replica(start_operator, "op-a", **FAST_LEASE)
    wait_until(lambda: holder(cluster).startswith("op-a_"), timeout=30, process=a)
    b, b_metrics, b_health = replica(start_operator, "op-b", **FAST_LEASE)
    wait_until(lambda: sample(b_metrics, "tollgate_operator_leader") == 0.0, process=b)
    status, body = get_json(b_health)
    assert status == 200 and body["leader"] is False, body  # a standby is alive

    kube.apply(gateway())
    kube.apply(apikey("k1"))
    wait_until(lambda: key_names(kube) == {"k1"}, timeout=30, process=a)
    wait_until(lambda: kube.get("Deployment", NS, "tollgate-gateway"), process=a)
    time.sleep(scaled(2))  # let b have every chance to act (it must not)

    # Exactly one acts: b sent nothing but reads of the Lease; every child was created
    # once, by a.
    b_sent = {(r.method.value, r.resource.plural if r.resource else None) for r in b.sent(cluster)}
    assert b_sent == {("GET", "leases")}, b_sent
    creates = Counter(
        (r.resource.plural, (r.data or {}).get("metadata", {}).get("name"))
        for r in writes(a.sent(cluster))
        if r.method.value == "POST" and r.resource and r.resource.plural not in ("events",)
    )
    assert creates and all(n == 1 for n in creates.values()), creates
    assert ("deployments", "tollgate-gateway") in creates

    # Metrics: a leads and has reconciled, b has not.
    a_samples = scrape(a_metrics)
    assert a_samples["tollgate_operator_leader"] == 1.0
    ok = 'tollgate_operator_reconcile_total{kind="InferenceGateway",result="success"}'
    assert a_samples[ok] >= 1
    assert a_samples['tollgate_operator_reconcile_total{kind="ApiKey",result="success"}'] >= 1
    count = 'tollgate_operator_reconcile_duration_seconds_count{kind="GatewayConfig"}'
    assert a_samples[count] >= 1
    assert 'tollgate_operator_pending{kind="InferenceGateway"}' in a_samples
    assert scrape(b_metrics)[ok] == 0.0

    # SIGKILL the leader: no release; b takes over once the lease has run out.
    killed_at = time.monotonic()
    a.kill()
    wait_until(lambda: holder(cluster).startswith("op-b_"), timeout=40, process=b)
    took = time.monotonic() - killed_at
    # Bound: the lease duration (8 s) plus a retry period, stretched for a busy machine.
    assert took < scaled(8 + 15), took
    assert lease(cluster)["spec"]["leaseTransitions"] == 1
    wait_until(lambda: sample(b_metrics, "tollgate_operator_leader") == 1.0, process=b)

    # b repairs what drifted while nobody led, and acts on new objects.
    kube.delete("Deployment", NS, "tollgate-gateway")
    kube.apply(apikey("k2"))
    wait_until(
        lambda: kube.get("Deployment", NS, "tollgate-gateway"),
        timeout=30,
        what="the Deployment recreated by the new leader",
        process=b,
    )
    wait_until(lambda: key_names(kube) == {"k1", "k2"}, timeout=30, process=b)
    b_creates = [
        r
        for r in writes(b.sent(cluster))
        if r.method.value == "POST" and r.resource and r.resource.plural == "deployments"
    ]
    assert len(b_creates) == 1
    assert get_json(b_health)[0] == 200 and get_json(b_health)[1]["leader"] is True


def test_a_clean_stop_hands_over_at_once(
    cluster: EmulatorThread, kube: Kube, start_operator: Callable[..., Operator]
) -> None:
    """SIGTERM: the leader stops kopf, then releases the Lease, and the standby takes it
    without waiting for the lease to run out (a rolling update)."""
    slow = {**FAST_LEASE, "TOLLGATE_LEASE_DURATION": "120", "TOLLGATE_LEASE_RENEW_DEADLINE": "60"}
    a, _, _ = replica(start_operator, "op-a", **slow)
    wait_until(lambda: holder(cluster).startswith("op-a_"), timeout=30, process=a)
    b, _, _ = replica(start_operator, "op-b", **slow)
    kube.apply(gateway())
    wait_until(lambda: kube.get("Deployment", NS, "tollgate-gateway"), timeout=30, process=a)
    assert a.stop() == 0
    wait_until(lambda: holder(cluster).startswith("op-b_"), timeout=30, process=b)
    kube.delete("Deployment", NS, "tollgate-gateway")
    wait_until(lambda: kube.get("Deployment", NS, "tollgate-gateway"), timeout=30, process=b)


def test_liveness_fails_while_the_api_server_is_unreachable(
    cluster: EmulatorThread, start_operator: Callable[..., Operator]
) -> None:
    proxy = TcpProxy(cluster.url)
    try:
        health = f"http://127.0.0.1:{free_port()}/healthz"
        op = start_operator(
            server=proxy.url,
            TOLLGATE_LIVENESS=health,
            TOLLGATE_LIVENESS_API_SECONDS="3",
            # Leadership outlasts the outage here: the probe is what is tested.
            TOLLGATE_LEASE_DURATION="120",
            TOLLGATE_LEASE_RENEW_DEADLINE="100",
            TOLLGATE_LEASE_RETRY_PERIOD="0.5",
        )
        wait_until(lambda: get_json(health)[0] == 200, timeout=30, process=op)
        wait_until(lambda: get_json(health)[1].get("leader") is True, timeout=30, process=op)
        proxy.cut()
        _, body = wait_until(
            lambda: (r := get_json(health))[0] == 503 and r,
            timeout=30,
            what="liveness 503 while the API server is unreachable",
            process=op,
        )
        assert any("API server" in p for p in body["problems"]), body
        assert op.alive()
        proxy.open()
        wait_until(
            lambda: get_json(health)[0] == 200,
            timeout=30,
            what="liveness 200 again once the API server answers",
            process=op,
        )
    finally:
        proxy.cut()
