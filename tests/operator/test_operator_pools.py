"""An InferencePool resolved to base URLs, as a pure function: which pods count, how their
addresses are written, and what a pool that cannot be used becomes (always an empty list,
never a guess)."""

from __future__ import annotations

import datetime
from typing import Any

from tollgate_contract.config import GatewayConfig, replica_url
from tollgate_operator import pools
from tollgate_operator.configdoc import GatewayView, build


def pool(ports: list[int], app_protocol: str | None = None, **labels: str) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "selector": {"matchLabels": labels},
        "targetPorts": [{"number": p} for p in ports],
        "endpointPickerRef": {"name": "epp", "port": {"number": 9002}},
    }
    if app_protocol:
        spec["appProtocol"] = app_protocol
    return {"metadata": {"name": "vllm", "namespace": "llm"}, "spec": spec}


def pod(
    name: str, ip: str | None, ready: bool = True, deleting: bool = False, **labels: str
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "llm", "labels": labels or {"app": "vllm"}}
    if deleting:
        meta["deletionTimestamp"] = "2026-06-01T00:00:00Z"
    status: dict[str, Any] = {"conditions": [{"type": "Ready", "status": str(ready)}]}
    if ip is not None:
        status["podIP"] = ip
    return {"metadata": meta, "status": status}


def test_ready_pods_on_every_port_sorted_and_deduplicated() -> None:
    pods = [
        pod("b", "10.0.0.9"),
        pod("a", "10.0.0.10"),
        pod("twin", "10.0.0.9"),  # the same address twice (host network): one URL
        pod("v6", "fd00::a:1"),
        pod("notready", "10.0.0.11", ready=False),
        pod("noip", None),
        pod("leaving", "10.0.0.12", deleting=True),
        pod("other", "10.0.0.13", app="other"),
    ]
    got = pools.resolve("vllm", pool([8001, 8000], app="vllm"), pods)
    assert got.upstreams == (
        "http://10.0.0.10:8000",
        "http://10.0.0.10:8001",
        "http://10.0.0.9:8000",
        "http://10.0.0.9:8001",
        "http://[fd00::a:1]:8000",
        "http://[fd00::a:1]:8001",
    )
    assert got.resolved and got.reason == "Resolved"
    assert got.members == {"a", "b", "twin", "v6", "notready", "noip", "leaving"}
    # Every URL passes the contract's own check.
    GatewayConfig.model_validate({"upstreams": list(got.upstreams)})


def test_unusable_pools_are_an_empty_list_with_a_reason() -> None:
    ready = [pod("a", "10.0.0.1")]
    cases = {
        "PoolMissing": pools.resolve("vllm", None, ready),
        "NoReadyPods": pools.resolve(
            "vllm", pool([8000], app="vllm"), [pod("a", "10.0.0.1", False)]
        ),
        # An empty selector would be every pod in the namespace (the gateways' own too).
        "EmptySelector": pools.resolve("vllm", pool([8000]), ready),
        # The gateway speaks HTTP/1.1 to its upstreams, not HTTP/2 with prior knowledge.
        "UnsupportedAppProtocol": pools.resolve(
            "vllm", pool([8000], "kubernetes.io/h2c", app="vllm"), ready
        ),
    }
    for reason, got in cases.items():
        assert (got.reason, got.upstreams, got.resolved) == (reason, (), False), reason
        assert "503" in got.message, reason
    assert pools.resolve("vllm", pool([8000], "http", app="vllm"), ready).resolved


def test_unreadable_keeps_what_was_written() -> None:
    got = pools.unreadable("vllm", 403, "403 Forbidden: no", ["http://10.0.0.1:8000"])
    assert (got.reason, got.upstreams) == ("Forbidden", ("http://10.0.0.1:8000",))
    assert pools.unreadable("vllm", 500, "500", []).reason == "PoolUnreadable"


def test_which_pod_events_concern_a_resolution() -> None:
    got = pools.resolve("vllm", pool([8000], app="vllm"), [pod("a", "10.0.0.1")])
    assert got.concerns("a", {"app": "moved"})  # was a member: its leaving matters
    assert got.concerns("new", {"app": "vllm", "extra": "x"})  # matches now
    assert not got.concerns("gateway-pod", {"app": "tollgate"})
    assert not pools.missing("vllm").concerns("x", {"app": "vllm"})


def test_replica_urls() -> None:
    assert replica_url("10.1.2.3", 8000) == "http://10.1.2.3:8000"
    assert replica_url("FD00:0:0::1", 80) == "http://[fd00::1]:80"
    assert replica_url("fe80::1%eth0", 80) is None
    assert replica_url("vllm-0", 80) is None


def test_documents_without_a_pool_have_no_upstreams() -> None:
    """Gateways that do not use a pool keep their document byte for byte."""
    gw = GatewayView("llm", "gw", "uid", default_policy=None, has_database=False)
    plain = build(gw, [], {}, {}, _now())
    assert plain.config.upstreams is None
    assert b"upstreams" not in plain.config.to_json()
    empty = build(gw, [], {}, {}, _now(), [])
    assert empty.config.upstreams == [] and b'"upstreams":[]' in empty.config.to_json()
    assert (
        GatewayView.from_body(
            {
                "metadata": {"name": "gw", "namespace": "llm"},
                "spec": {"upstream": {"inferencePool": {"name": "vllm"}}},
            }
        ).inference_pool
        == "vllm"
    )


def _now() -> datetime.datetime:
    return datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)
