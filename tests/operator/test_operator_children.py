"""What the operator renders for a real cluster (children.py, pure functions): the fields
an API server accepts but that only a real cluster shows to be missing (issue #13)."""

from __future__ import annotations

from typing import Any

from tollgate_operator import children


def _gateway(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "gw", "namespace": "llm", "uid": "u-1"},
        "spec": {"upstream": {"url": "http://vllm:8000"}, **spec},
    }


def _exporter(**spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "gpus", "namespace": "gpu", "uid": "u-2"}, "spec": spec}


def _pod(manifest: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = manifest["spec"]["template"]["spec"]
    return pod


# ---- #13.8: metrics on their own port, never on the client-facing Service -----------------


def test_metrics_have_their_own_port_and_service() -> None:
    gw = _gateway(service={"type": "LoadBalancer"})
    (container,) = _pod(children.gateway_deployment(gw))["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080, "metrics": 9090}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["GATEWAY_METRICS_PORT"] == "9090"

    api = children.gateway_service(gw)
    assert api["spec"]["type"] == "LoadBalancer"
    assert [p["targetPort"] for p in api["spec"]["ports"]] == ["http"]

    metrics = children.gateway_metrics_service(gw)
    assert metrics["spec"]["type"] == "ClusterIP"  # whatever the API Service's type
    assert [p["targetPort"] for p in metrics["spec"]["ports"]] == ["metrics"]

    monitor = children.gateway_service_monitor(gw)["spec"]
    assert monitor["endpoints"][0]["port"] == "metrics"
    selected = monitor["selector"]["matchLabels"].items()
    assert selected <= metrics["metadata"]["labels"].items()
    assert not selected <= api["metadata"]["labels"].items()
    # Prometheus' job stays the API Service's name (dashboards and alerts match on it).
    assert metrics["metadata"]["labels"][monitor["jobLabel"]] == api["metadata"]["name"]


# ---- #13.4: a vLLM outage never blocks a node drain ---------------------------------------


def test_pdb_always_allows_evicting_unready_pods() -> None:
    pdb = children.gateway_pdb(_gateway())
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


# ---- #13.7: NetworkPolicies ---------------------------------------------------------------


def test_gateway_network_policy_admits_only_its_ports() -> None:
    policy = children.gateway_network_policy(_gateway())
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    assert spec["podSelector"]["matchLabels"] == children.selector_labels("gateway", "gw")
    ports = sorted(p["port"] for rule in spec["ingress"] for p in rule["ports"])
    assert ports == [8080, 9090]
    peers = [{"namespaceSelector": {"matchLabels": {"team": "a"}}}]
    limited = children.gateway_network_policy(_gateway(networkPolicy={"apiFrom": peers}))
    assert limited["spec"]["ingress"][0]["from"] == peers


def test_upstream_policy_admits_only_the_gateway() -> None:
    gw = _gateway(networkPolicy={"upstreamPodSelector": {"app": "vllm"}})
    spec = children.upstream_network_policy(gw)["spec"]
    assert spec["podSelector"] == {"matchLabels": {"app": "vllm"}}
    assert spec["ingress"] == [
        {"from": [{"podSelector": {"matchLabels": children.selector_labels("gateway", "gw")}}]}
    ]


# ---- #13.10: the gateway's Role: get and watch its one Secret, no list -------------------


def test_gateway_role_is_get_and_watch_by_name() -> None:
    (rule,) = children.gateway_role(_gateway())["rules"]
    assert rule["verbs"] == ["get", "watch"]
    assert rule["resourceNames"] == [children.config_secret_name("gw")]


# ---- #13.15: HA knobs ----------------------------------------------------------------------


def test_gateway_pods_spread_over_nodes_by_default_and_take_the_knobs() -> None:
    pod = _pod(children.gateway_deployment(_gateway()))
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["labelSelector"]["matchLabels"] == children.selector_labels("gateway", "gw")
    affinity = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}
    deployment = children.gateway_deployment(
        _gateway(
            affinity=affinity,
            priorityClassName="high",
            podAnnotations={"a": "1"},
            podLabels={"team": "x", "app.kubernetes.io/name": "not-this"},
        )
    )
    pod = _pod(deployment)
    assert pod["affinity"] == affinity and pod["priorityClassName"] == "high"
    meta = deployment["spec"]["template"]["metadata"]
    assert meta["annotations"] == {"a": "1"}
    assert meta["labels"]["team"] == "x"
    assert meta["labels"]["app.kubernetes.io/name"] == "tollgate-gateway"  # selector wins


# ---- #13.1: the exporter can see the GPUs ---------------------------------------------------


def test_exporter_asks_the_nvidia_toolkit_for_nvml() -> None:
    ds = children.exporter_daemonset(_exporter(runtimeClassName="nvidia", hostPID=True))
    pod = _pod(ds)
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert "utility" in env["NVIDIA_DRIVER_CAPABILITIES"].split(",")
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["hostPID"] is True
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    # Not Ready while NVML is down (the exporter's /ready), restarted only when stuck.
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"


def test_exporter_priority_and_host_pid_are_options() -> None:
    pod = _pod(children.exporter_daemonset(_exporter()))
    assert "priorityClassName" not in pod  # system-node-critical is refused outside kube-system
    assert "hostPID" not in pod and "runtimeClassName" not in pod
    pod = _pod(children.exporter_daemonset(_exporter(priorityClassName="system-node-critical")))
    assert pod["priorityClassName"] == "system-node-critical"
