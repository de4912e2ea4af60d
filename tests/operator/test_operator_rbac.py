"""The operator's API access, derived from what it really sent, against rbac.USED."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from harness import Kube, Operator, wait_until
from k8s_emulator import TEST_USER_AGENT, EmulatorThread
from test_operator_inferencepool import inference_pool, model_pod, pool_gateway, upstreams
from test_operator_reconcile import NS, apikey, gateway, key_names, policy

from tollgate_operator import rbac


def verb_of(request: Any) -> str:
    method = request.method.value
    if method == "GET":
        if request.params.get("watch") in ("true", "1"):
            return "watch"
        return "list" if request.name is None else "get"
    return {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[method]


def used_access(cluster: EmulatorThread) -> dict[tuple[str, str], set[str]]:
    used: dict[tuple[str, str], set[str]] = {}
    for request in cluster.requests():
        if request.headers.get("User-Agent") == TEST_USER_AGENT:
            continue
        resource = request.resource
        if resource is None or resource.plural is None:
            continue  # discovery: allowed to everyone
        name = resource.plural + (f"/{request.subresource}" if request.subresource else "")
        used.setdefault((resource.group or "", name), set()).add(verb_of(request))
    return used


@pytest.mark.parametrize(
    "cluster", [{"service_monitor": True, "inference_pool": True}], indirect=True
)
def test_operator_uses_exactly_the_declared_access(
    cluster: EmulatorThread, kube: Kube, operator: Operator
) -> None:
    # Exercise every path: children, PDB/ServiceMonitor switched off, generated and user
    # keys, rotation, revocation, a held policy, the exporter, database usage.
    kube.apply(policy("std", tokensPerDay=10))
    db = base64.b64encode(b"postgresql://nobody@127.0.0.1:1/none").decode()
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "db", "namespace": NS},
            "data": {"database-url": db},
        }
    )
    kube.apply(gateway(defaultPolicy="std", database={"urlSecretRef": {"name": "db"}}))
    kube.apply(apikey("a"))
    kube.apply(apikey("b"))
    wait_until(lambda: key_names(kube) == {"a", "b"})
    until = "2999-01-01T00:00:00Z"
    kube.patch("ApiKey", NS, "a", {"spec": {"rotation": {"id": "1", "previousValidUntil": until}}})
    wait_until(lambda: kube.secret_data(NS, "a-key", "previous"))
    # Children drifted by hand are put back on the next reconcile (patch).
    tamper = {"metadata": {"labels": {"app.kubernetes.io/managed-by": "someone"}}}
    gateway_kinds = ["Deployment", "Service", "ServiceAccount", "Role", "RoleBinding"]
    gateway_kinds += ["PodDisruptionBudget", "NetworkPolicy"]
    for kind in [*gateway_kinds, "ServiceMonitor"]:
        kube.patch(kind, NS, "tollgate-gateway", tamper)
    kube.patch("InferenceGateway", NS, "tollgate", {"spec": {"replicas": 3}})
    wait_until(lambda: all(_managed(kube.get(k, NS, "tollgate-gateway")) for k in gateway_kinds))
    kube.patch(
        "InferenceGateway",
        NS,
        "tollgate",
        {
            "spec": {
                "podDisruptionBudget": {"enabled": False},
                "networkPolicy": {"enabled": False},
                "monitoring": {"serviceMonitor": False},
            }
        },
    )
    wait_until(lambda: kube.get("PodDisruptionBudget", NS, "tollgate-gateway") is None)
    wait_until(lambda: kube.get("NetworkPolicy", NS, "tollgate-gateway") is None)
    wait_until(lambda: kube.get("ServiceMonitor", NS, "tollgate-gateway") is None)
    kube.delete("ApiKey", NS, "b")
    wait_until(lambda: kube.get("ApiKey", NS, "b") is None)
    kube.apply(
        {
            "apiVersion": "tollgate.dev/v1alpha1",
            "kind": "GPUExporter",
            "metadata": {"name": "gpus", "namespace": NS},
            "spec": {},
        }
    )
    wait_until(lambda: kube.get("ServiceMonitor", NS, "gpus-gpu-exporter"))
    for kind in ("DaemonSet", "ServiceMonitor"):
        kube.patch(kind, NS, "gpus-gpu-exporter", tamper)
    kube.patch("GPUExporter", NS, "gpus", {"spec": {"intervalSeconds": 10}})
    wait_until(lambda: _managed(kube.get("ServiceMonitor", NS, "gpus-gpu-exporter")))
    # A second gateway on an InferencePool: the pool read, its pods listed by selector.
    kube.apply(inference_pool())
    model_pod(kube, "vllm-a", "10.0.0.1", ready=True)
    kube.apply(pool_gateway(name="pooled"))
    wait_until(lambda: upstreams(kube, "pooled") == ["http://10.0.0.1:8000"])
    kube.delete("QuotaPolicy", NS, "std")
    wait_until(lambda: key_names(kube) == set(), what="keys out once their policy is gone")
    # Drift: children deleted by hand come back (through the child watches).
    kube.delete("Deployment", NS, "tollgate-gateway")
    wait_until(lambda: kube.get("Deployment", NS, "tollgate-gateway"), what="the Deployment back")
    # The Lease is renewed (update) every retry period.
    wait_until(lambda: lease_renewed(cluster), what="the Lease renewed at least once")
    assert cluster.denials() == [], "the chart's RBAC refused the operator something"

    used = used_access(cluster)
    declared = {k: set(v) for k, v in rbac.USED.items()}
    declared[rbac.LEASE_RESOURCE] = set(rbac.LEADER_ELECTION_BY_NAME | rbac.LEADER_ELECTION_CREATE)
    undeclared = {k: v - declared.get(k, set()) for k, v in used.items()}
    assert {k: v for k, v in undeclared.items() if v} == {}
    unused = {k: v - used.get(k, set()) for k, v in declared.items()}
    assert {k: v for k, v in unused.items() if v} == {}


def lease_renewed(cluster: EmulatorThread) -> bool:
    lease = cluster.objects("coordination.k8s.io", "leases").get(("tollgate", "tollgate-operator"))
    spec = (lease or {}).get("spec") or {}
    return bool(spec) and spec.get("renewTime") != spec.get("acquireTime")


def _managed(obj: dict[str, Any] | None) -> bool:
    labels = (obj or {}).get("metadata", {}).get("labels", {})
    return labels.get("app.kubernetes.io/managed-by") == "tollgate-operator"


def test_cluster_role_rules_cover_used_and_grant_only() -> None:
    rules = rbac.cluster_role_rules()
    granted = {(r["apiGroups"][0], r["resources"][0]): set(r["verbs"]) for r in rules}
    for table in (rbac.USED, rbac.GRANT_ONLY):
        for key, verbs in table.items():
            assert verbs <= granted[key]
    # What each gateway's Role grants must be held by the operator (escalation rule).
    assert {"get", "list", "watch"} <= granted[("", "secrets")]
