"""The chart for a production cluster (issue #13): Pod Security levels per part, the
NetworkPolicies, the exporter in its own namespace with its GPU access fields, and values
GitOps and autoscalers can live with."""

from __future__ import annotations

from typing import Any

import pytest
from chart_support import NAMESPACE, RELEASE, Manifest, of_kind, one, render

from tollgate_operator import children


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """Pod Security Standards, level `restricted` (the checks that apply to these pods)."""
    problems = []
    pod_sc = pod.get("securityContext") or {}
    if pod.get("hostPID") or pod.get("hostNetwork") or pod.get("hostIPC"):
        problems.append("host namespaces")
    if any("hostPath" in v for v in pod.get("volumes") or []):
        problems.append("hostPath volume")
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        sc = container.get("securityContext") or {}
        name = container["name"]
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation")
        if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
            problems.append(f"{name}: runAsNonRoot")
        if sc.get("runAsUser") == 0 or pod_sc.get("runAsUser") == 0:
            problems.append(f"{name}: runAsUser 0")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
            problems.append(f"{name}: capabilities not dropped")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccomp")
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
    return problems


def _pods(docs: list[Manifest]) -> dict[str, dict[str, Any]]:
    pods = {}
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            pods[f"{doc['kind']}/{doc['metadata']['name']}"] = doc["spec"]["template"]["spec"]
        elif doc["kind"] == "Pod":
            pods[f"Pod/{doc['metadata']['name']}"] = doc["spec"]
    return pods


# ---- #13.12: Pod Security levels ----------------------------------------------------------


def test_the_release_namespace_can_enforce_restricted() -> None:
    pods = _pods(render())
    assert pods, "no pods rendered"
    for where, pod in pods.items():
        assert restricted_violations(pod) == [], where
    gateway = {"metadata": {"name": RELEASE, "namespace": NAMESPACE, "uid": "u"}, "spec": {}}
    gateway["spec"] = {"upstream": {"url": "http://vllm:8000"}}
    assert (
        restricted_violations(children.gateway_deployment(gateway)["spec"]["template"]["spec"])
        == []
    )


def test_the_exporter_needs_privileged_and_can_live_in_its_own_namespace() -> None:
    docs = render(
        {
            "gpuExporter": {
                "enabled": True,
                "namespace": "tollgate-gpu",
                "runtimeClassName": "nvidia",
                "hostPID": True,
            },
            "operator": {"watchNamespaces": [NAMESPACE, "tollgate-gpu"]},
        }
    )
    exporter = one(docs, "GPUExporter")
    assert exporter["metadata"]["namespace"] == "tollgate-gpu"
    assert exporter["spec"]["runtimeClassName"] == "nvidia"
    assert exporter["spec"]["hostPID"] is True
    assert {r["metadata"]["namespace"] for r in of_kind(docs, "Role")} == {
        NAMESPACE,
        "tollgate-gpu",
    }
    ds = children.exporter_daemonset(
        {
            "metadata": {"name": "x", "namespace": "tollgate-gpu", "uid": "u"},
            "spec": exporter["spec"],
        }
    )
    assert restricted_violations(ds["spec"]["template"]["spec"])  # privileged, by design
    no_host = children.exporter_daemonset(
        {
            "metadata": {"name": "x", "namespace": "tollgate-gpu", "uid": "u"},
            "spec": {"podResources": {"enabled": False}},
        }
    )
    assert "hostPath volume" not in restricted_violations(no_host["spec"]["template"]["spec"])


# ---- #13.7: NetworkPolicies --------------------------------------------------------------


def test_postgres_admits_only_gateway_and_operator_pods() -> None:
    policy = one(render(), "NetworkPolicy")
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    postgres = one(render(), "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert spec["podSelector"]["matchLabels"].items() <= postgres.items()
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 5432}]
    peers = [p["podSelector"]["matchLabels"] for p in rule["from"]]
    gateway_pod = children.labels("gateway", RELEASE)
    operator_pod = one(render(), "Deployment", f"{RELEASE}-operator")["spec"]["template"][
        "metadata"
    ]["labels"]
    assert any(peer.items() <= gateway_pod.items() for peer in peers)
    assert any(peer.items() <= operator_pod.items() for peer in peers)
    assert all(not peer.items() <= {"app": "vllm"}.items() for peer in peers)


@pytest.mark.parametrize("enabled", [True, False])
def test_network_policy_switch_reaches_the_gateway(enabled: bool) -> None:
    docs = render(
        {
            "networkPolicy": {"enabled": enabled},
            "gateway": {"upstream": {"podSelector": {"app": "vllm"}}},
        }
    )
    spec = one(docs, "InferenceGateway")["spec"]["networkPolicy"]
    assert spec["enabled"] is enabled
    assert spec["upstreamPodSelector"] == {"app": "vllm"}
    assert bool(of_kind(docs, "NetworkPolicy")) is enabled


# ---- #13.14 / #13.15: autoscaling and HA knobs --------------------------------------------


def test_null_replicas_leave_the_count_to_an_autoscaler() -> None:
    spec = one(render({"gateway": {"replicas": None}}), "InferenceGateway")["spec"]
    assert "replicas" not in spec
    assert one(render(), "InferenceGateway")["spec"]["replicas"] == 2


def test_ha_knobs_reach_the_gateway() -> None:
    values = {
        "gateway": {
            "priorityClassName": "high",
            "podAnnotations": {"a": "1"},
            "podLabels": {"team": "x"},
            "affinity": {
                "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}
            },
        }
    }
    spec = one(render(values), "InferenceGateway")["spec"]
    assert spec["priorityClassName"] == "high"
    assert spec["podAnnotations"] == {"a": "1"} and spec["podLabels"] == {"team": "x"}
    assert "podAntiAffinity" in spec["affinity"]
