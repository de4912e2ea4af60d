"""An InferencePool as an InferenceGateway's upstream, against the emulated API with the
operator as a real process: the config document's `upstreams` follow the pool's ready pods
within seconds, a pool that is missing (or cannot be read) sends traffic nowhere, and the
status says why."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from harness import OPERATOR_NAMESPACE, Kube, Operator, operator_rbac, wait_until
from k8s_emulator import EmulatorThread
from test_operator_reconcile import CONFIG, GW, NS, apikey, config, key_names, operator_writes

POOLS = pytest.mark.parametrize("cluster", [{"inference_pool": True}], indirect=True)
# Pods becoming ready or going away reach the document within this (the writer's debounce
# is at most 0.6 s in the tests, plus a few API round trips).
SECONDS = 5.0
UPSTREAM_ENV = {"VLLM_URL", "VLLM_URLS", "VLLM_DNS_NAME"}


def inference_pool(ports: tuple[int, ...] = (8000,), **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": "vllm", "namespace": NS},
        "spec": {
            "selector": {"matchLabels": labels or {"app": "vllm"}},
            "targetPorts": [{"number": p} for p in ports],
            "endpointPickerRef": {"name": "vllm-epp", "port": {"number": 9002}},
        },
    }


def pool_gateway(pool: str = "vllm", name: str = GW) -> dict[str, Any]:
    return {
        "apiVersion": "tollgate.dev/v1alpha1",
        "kind": "InferenceGateway",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"upstream": {"inferencePool": {"name": pool}}, "replicas": 2},
    }


def model_pod(kube: Kube, name: str, ip: str, ready: bool, app: str = "vllm") -> None:
    """A model-server pod as a kubelet would report it (status through /status)."""
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": {"app": app}},
            "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]},
        }
    )
    set_ready(kube, name, ip, ready)


def set_ready(kube: Kube, name: str, ip: str, ready: bool) -> None:
    status = {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    kube.patch("Pod", NS, name, {"status": status}, sub="status")


def upstreams(kube: Kube, gateway: str = GW) -> list[str] | None:
    """The document's `upstreams` (None: no document yet, or none in it)."""
    raw = kube.secret_data(NS, f"{gateway}-gateway-config", "config.json")
    return json.loads(raw).get("upstreams") if raw else None


def condition(kube: Kube, type_: str = "UpstreamResolved") -> dict[str, Any]:
    status = (kube.get("InferenceGateway", NS, GW) or {}).get("status") or {}
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def reason(kube: Kube) -> str | None:
    return condition(kube).get("reason")


def pool_reads(cluster: EmulatorThread, since: int) -> int:
    """GETs of the InferencePool since request `since` (each writer pass makes one)."""
    return sum(
        1
        for r in cluster.requests()[since:]
        if r.method.value == "GET"
        and r.resource is not None
        and r.resource.plural == "inferencepools"
        and r.name is not None
    )


def container_env(kube: Kube, gateway: str = GW) -> dict[str, Any]:
    dep = kube.get("Deployment", NS, f"{gateway}-gateway") or {}
    containers = ((dep.get("spec") or {}).get("template") or {}).get("spec", {}).get("containers")
    return {e["name"]: e.get("value") for e in (containers or [{}])[0].get("env", [])}


@POOLS
def test_upstreams_follow_the_pools_ready_pods(
    cluster: EmulatorThread, kube: Kube, start_operator: Callable[..., Operator]
) -> None:
    operator = start_operator()
    kube.apply(inference_pool())
    model_pod(kube, "vllm-a", "10.0.0.1", ready=True)
    model_pod(kube, "vllm-b", "fd00::2", ready=True)
    model_pod(kube, "vllm-c", "10.0.0.3", ready=False)
    model_pod(kube, "other", "10.0.0.9", ready=True, app="other")
    kube.apply(pool_gateway())
    # Beside it, a gateway with a URL: its document has no `upstreams` at all.
    plain = pool_gateway(name="plain")
    plain["spec"]["upstream"] = {"url": "http://vllm:8000"}
    kube.apply(plain)

    two = ["http://10.0.0.1:8000", "http://[fd00::2]:8000"]
    wait_until(lambda: upstreams(kube) == two, what="the two ready pods", process=operator)
    env = wait_until(lambda: container_env(kube), what="the gateway Deployment")
    assert not UPSTREAM_ENV & set(env), env  # the document names the replicas
    wait_until(lambda: reason(kube) == "Resolved", what="UpstreamResolved=True")
    assert condition(kube)["status"] == "True"
    gw_status = kube.get("InferenceGateway", NS, GW)["status"]
    assert gw_status["upstreamEndpoints"] == 2 and gw_status["configSecret"] == CONFIG

    wait_until(lambda: kube.get("Secret", NS, "plain-gateway-config"), what="plain's config")
    assert "upstreams" not in (kube.secret_data(NS, "plain-gateway-config", "config.json") or "")
    assert container_env(kube, "plain")["VLLM_URL"] == "http://vllm:8000"
    plain_status = kube.get("InferenceGateway", NS, "plain").get("status") or {}
    assert "upstreamEndpoints" not in plain_status
    assert "UpstreamResolved" not in {c["type"] for c in plain_status.get("conditions") or []}

    # A pod becoming ready joins within seconds.
    set_ready(kube, "vllm-c", "10.0.0.3", ready=True)
    three = sorted([*two, "http://10.0.0.3:8000"])
    wait_until(lambda: upstreams(kube) == three, timeout=SECONDS, what="vllm-c joined")
    # A pod going unready leaves; a deleted one too.
    set_ready(kube, "vllm-c", "10.0.0.3", ready=False)
    wait_until(lambda: upstreams(kube) == two, timeout=SECONDS, what="vllm-c left (not ready)")
    kube.delete("Pod", NS, "vllm-a")
    only_b = ["http://[fd00::2]:8000"]
    wait_until(lambda: upstreams(kube) == only_b, timeout=SECONDS, what="vllm-a removed")
    # The pool's ports and selector are followed too.
    kube.patch(
        "InferencePool", NS, "vllm", {"spec": {"targetPorts": [{"number": 8000}, {"number": 8001}]}}
    )
    both_ports = ["http://[fd00::2]:8000", "http://[fd00::2]:8001"]
    wait_until(lambda: upstreams(kube) == both_ports, timeout=SECONDS, what="a second port")
    kube.patch(
        "InferencePool", NS, "vllm", {"spec": {"selector": {"matchLabels": {"app": "other"}}}}
    )
    other = ["http://10.0.0.9:8000", "http://10.0.0.9:8001"]
    wait_until(lambda: upstreams(kube) == other, timeout=SECONDS, what="the new selector")
    # Relabelling a pod out of the pool removes it (it was a member: its event counts).
    kube.patch("Pod", NS, "other", {"metadata": {"labels": {"app": "retired"}}})
    wait_until(lambda: upstreams(kube) == [], timeout=SECONDS, what="relabelled out")
    wait_until(lambda: reason(kube) == "NoReadyPods", what="UpstreamResolved=False NoReadyPods")
    kube.patch("Pod", NS, "vllm-b", {"metadata": {"labels": {"app": "other"}}})
    wait_until(lambda: upstreams(kube) == both_ports, timeout=SECONDS, what="relabelled in")
    wait_until(lambda: reason(kube) == "Resolved")

    # A restart against the unchanged pool writes nothing: no empty list in between.
    time.sleep(1.5)  # an observation window for the status timers to settle, not a wait
    operator.stop()
    mark = len(cluster.requests())
    second = start_operator(TOLLGATE_LOG_LEVEL="DEBUG")
    # Let it list, start both gateways' writers (their first pass reads the pool) and run
    # the status timers a few times.
    wait_until(lambda: second.output().count("Timer 'refresh' succeeded") >= 6)
    wait_until(lambda: pool_reads(cluster, mark) >= 1, what="the pool read again")
    time.sleep(1.5)  # an observation window for the status written after it, not a wait
    writes = operator_writes(cluster, mark)
    assert writes == [], [(r.method.value, str(r.url), r.data) for r in writes]


@POOLS
def test_a_missing_pool_sends_traffic_nowhere(kube: Kube, operator: Operator) -> None:
    """An empty list, not the gateway's default VLLM_URL and not the last pods seen: the
    gateway answers 503 no_healthy_upstream, and the condition says why."""
    kube.apply(pool_gateway())
    wait_until(lambda: upstreams(kube) == [], what="an empty list", process=operator)
    wait_until(lambda: reason(kube) == "PoolMissing", what="UpstreamResolved=False PoolMissing")
    assert condition(kube)["status"] == "False" and "503" in condition(kube)["message"]
    assert kube.get("InferenceGateway", NS, GW)["status"]["upstreamEndpoints"] == 0
    events = [e for e in kube.list("Event", NS) if e.get("reason") == "PoolMissing"]
    assert events and events[0]["type"] == "Warning"

    model_pod(kube, "vllm-a", "10.0.0.1", ready=True)
    kube.apply(inference_pool())
    wait_until(lambda: upstreams(kube) == ["http://10.0.0.1:8000"], timeout=SECONDS)
    wait_until(lambda: reason(kube) == "Resolved")
    kube.delete("InferencePool", NS, "vllm")
    wait_until(lambda: upstreams(kube) == [], timeout=SECONDS, what="the pool deleted")
    wait_until(lambda: reason(kube) == "PoolMissing")


@POOLS
def test_switching_between_a_url_and_a_pool(kube: Kube, operator: Operator) -> None:
    kube.apply(inference_pool())
    model_pod(kube, "vllm-a", "10.0.0.1", ready=True)
    gw = pool_gateway()
    gw["spec"]["upstream"] = {"url": "http://vllm:8000"}
    kube.apply(gw)
    wait_until(lambda: container_env(kube).get("VLLM_URL") == "http://vllm:8000")
    wait_until(lambda: config(kube) is not None)
    assert upstreams(kube) is None
    to_pool = {"spec": {"upstream": {"url": None, "inferencePool": {"name": "vllm"}}}}
    kube.patch("InferenceGateway", NS, GW, to_pool)
    wait_until(lambda: upstreams(kube) == ["http://10.0.0.1:8000"], timeout=SECONDS)
    wait_until(lambda: not UPSTREAM_ENV & set(container_env(kube)), what="no VLLM_URL env")
    to_url = {"spec": {"upstream": {"url": "http://vllm:8000", "inferencePool": None}}}
    kube.patch("InferenceGateway", NS, GW, to_url)
    wait_until(lambda: config(kube) is not None and upstreams(kube) is None, timeout=SECONDS)
    wait_until(lambda: container_env(kube).get("VLLM_URL") == "http://vllm:8000")
    wait_until(lambda: not condition(kube), what="UpstreamResolved gone with the pool")


def test_pool_kind_not_served(kube: Kube, operator: Operator) -> None:
    """Without the Inference Extension's CRDs: an empty list and a condition that says
    what to install (the operator starts anyway)."""
    kube.apply(pool_gateway())
    wait_until(lambda: upstreams(kube) == [], what="an empty list", process=operator)
    wait_until(lambda: reason(kube) == "PoolKindNotServed")
    assert "Inference Extension" in condition(kube)["message"]


@POOLS
def test_without_the_new_rbac_the_operator_fails_closed(
    cluster: EmulatorThread, kube: Kube, tmp_path: Any
) -> None:
    """RBAC from before this feature (no pods, no inferencepools): the emulator refuses
    the reads, the gateway gets no upstream (503) and says Forbidden, and everything else
    (keys, revocation) still works: nothing stalls on the refused watches. (Once kopf has
    spent its retries on them, about a minute, it stops and the operator exits 1: loud,
    as for any kind whose RBAC is missing; docs/operator.md.)"""
    model_pod(kube, "vllm-a", "10.0.0.1", ready=True)
    kube.apply(inference_pool())
    new = {("", "pods"), ("inference.networking.k8s.io", "inferencepools")}
    values = {"operator": {"watchNamespaces": ["tollgate", "llm"]}}
    for doc in operator_rbac(values):
        if doc["kind"] == "Role":
            doc["rules"] = [
                r
                for r in doc["rules"]
                if not {(g, res) for g in r["apiGroups"] for res in r["resources"]} & new
            ]
        kube.apply(doc)
    operator = Operator(cluster, tmp_path, ["tollgate", "llm"])
    try:
        kube.apply(pool_gateway())
        kube.apply(apikey("a"))
        wait_until(lambda: key_names(kube) == {"a"}, what="the key served", process=operator)
        assert upstreams(kube) == []
        wait_until(lambda: reason(kube) == "Forbidden", what="UpstreamResolved=False Forbidden")
        assert "forbidden" in condition(kube)["message"].lower()
        denied = {(a.group, a.resource) for u, a in cluster.denials()}
        assert new <= denied, denied
        assert all(
            u.name.endswith(f"{OPERATOR_NAMESPACE}:tollgate-operator") for u, _ in cluster.denials()
        )
        # Revocation still reaches the document.
        kube.delete("ApiKey", NS, "a")
        wait_until(lambda: key_names(kube) == set(), timeout=SECONDS, what="the key revoked")
        assert operator.alive()
    finally:
        operator.stop()


def test_the_emulator_lists_by_label_selector(kube: Kube) -> None:
    """What the writer's pod list relies on: the API server, not the client, filters."""
    model_pod(kube, "a", "10.0.0.1", ready=True, app="vllm")
    model_pod(kube, "b", "10.0.0.2", ready=True, app="other")
    pods = "/api/v1/namespaces/llm/pods"

    def names(selector: str) -> set[str]:
        response = kube.http.get(pods, params={"labelSelector": selector})
        response.raise_for_status()
        return {p["metadata"]["name"] for p in response.json()["items"]}

    assert names("app=vllm") == names("app==vllm") == {"a"}
    assert names("app!=vllm") == {"b"}
    assert names("app") == {"a", "b"} and names("!app") == set()
    assert names("") == {"a", "b"}
    assert kube.http.get(pods, params={"labelSelector": "app in (vllm)"}).status_code == 400
    # The status was written through the status subresource, as a kubelet writes it.
    assert kube.get("Pod", NS, "a")["status"]["podIP"] == "10.0.0.1"
