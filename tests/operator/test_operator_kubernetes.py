"""What a real API server enforces, and the operator right against it (issue #13): RBAC
with the chart's own roles, owner-reference permission enforcement, garbage collection,
namespace deletion, CRD validation; drift repair, an uninstall that ends, Secret opt-in."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import OPERATOR_NAMESPACE, Kube, Operator, operator_rbac, wait_until
from k8s_emulator import TEST_USER_AGENT, EmulatorThread
from test_operator_reconcile import (
    CONFIG,
    GW,
    NS,
    apikey,
    config,
    gateway,
    key_names,
    policy,
    ready,
)

from tollgate_operator.keys import OPT_IN_LABEL

CHILD = f"{GW}-gateway"


def _secret(name: str, value: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": NS}
    if labels:
        meta["labels"] = labels
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "data": {"key": base64.b64encode(value.encode()).decode()},
    }


# ---- the emulator is as strict as an API server --------------------------------------------


def test_requests_need_a_token_and_rbac(cluster: EmulatorThread) -> None:
    anonymous = httpx.get(f"{cluster.url}/api/v1/namespaces/{NS}/secrets")
    assert anonymous.status_code == 403, anonymous.text  # system:anonymous, no binding
    headers = {"Authorization": "Bearer not-a-token"}
    assert httpx.get(f"{cluster.url}/api", headers=headers).status_code == 401
    nobody = Kube(cluster.url, cluster.service_account_token(NS, "nobody"))
    response = nobody.http.get(f"/api/v1/namespaces/{NS}/secrets")
    assert response.status_code == 403, response.text
    assert 'cannot list resource "secrets"' in response.json()["message"]


def test_crds_are_validated_on_write(kube: Kube) -> None:
    bad_name = gateway()
    bad_name["metadata"]["name"] = "gw.prod"  # a Service name cannot hold a dot
    response = kube.http.post(
        f"/apis/tollgate.dev/v1alpha1/namespaces/{NS}/inferencegateways", json=bad_name
    )
    assert response.status_code == 422, response.text
    assert "DNS-1035" in response.json()["message"]
    no_upstream = gateway()
    no_upstream["spec"] = {"replicas": 2}
    response = kube.http.post(
        f"/apis/tollgate.dev/v1alpha1/namespaces/{NS}/inferencegateways", json=no_upstream
    )
    assert response.status_code == 422 and "upstream" in response.json()["message"]
    both = gateway(upstream={"url": "http://a:1", "dnsName": "b:1"})
    response = kube.http.post(
        f"/apis/tollgate.dev/v1alpha1/namespaces/{NS}/inferencegateways", json=both
    )
    assert response.status_code == 422 and "exactly one of" in response.json()["message"]


def test_garbage_collection_and_namespace_deletion(kube: Kube, cluster: EmulatorThread) -> None:
    cluster.create_namespaces("gc")
    owner = kube.apply(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "o", "namespace": "gc"}}
    )
    ref = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "o",
        "uid": owner["metadata"]["uid"],
        "blockOwnerDeletion": True,
    }

    def child(name: str, finalizers: list[str] | None = None) -> None:
        meta: dict[str, Any] = {"name": name, "namespace": "gc", "ownerReferences": [ref]}
        if finalizers:
            meta["finalizers"] = finalizers
        kube.apply({"apiVersion": "v1", "kind": "Secret", "metadata": meta})

    child("a")
    child("b", ["example.com/hold"])
    kube.delete("ConfigMap", "gc", "o", propagation="Foreground")
    # Foreground: the owner waits for its blocking dependents.
    assert kube.get("ConfigMap", "gc", "o")["metadata"]["deletionTimestamp"]
    assert kube.get("Secret", "gc", "a") is None
    assert kube.get("Secret", "gc", "b")["metadata"]["deletionTimestamp"]
    kube.patch("Secret", "gc", "b", {"metadata": {"finalizers": None}})
    assert kube.get("ConfigMap", "gc", "o") is None

    # A namespace stays Terminating while something in it holds a finalizer.
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "held", "namespace": "gc", "finalizers": ["example.com/x"]},
        }
    )
    kube.delete("Namespace", None, "gc")
    assert kube.get("Namespace", None, "gc")["status"]["phase"] == "Terminating"
    refused = kube.http.post("/api/v1/namespaces/gc/secrets", json={"metadata": {"name": "n"}})
    assert refused.status_code == 403
    kube.patch("Secret", "gc", "held", {"metadata": {"finalizers": None}})
    assert kube.get("Namespace", None, "gc") is None


# ---- #13.3: owner-reference permission enforcement -----------------------------------------


def test_children_need_update_on_the_owners_finalizers(
    cluster: EmulatorThread, kube: Kube, tmp_path: Path
) -> None:
    """The chart's RBAC minus `<kind>/finalizers`: every child create is refused, as on a
    cluster with OwnerReferencesPermissionEnforcement. With it (the chart as it ships) the
    other tests create children."""
    for doc in operator_rbac({"operator": {"watchNamespaces": [OPERATOR_NAMESPACE, NS]}}):
        if doc["kind"] == "Role":
            doc["rules"] = [
                r for r in doc["rules"] if not r["resources"][0].endswith("/finalizers")
            ]
        kube.apply(doc)
    operator = Operator(cluster, tmp_path, [OPERATOR_NAMESPACE, NS])
    try:
        kube.apply(gateway())
        reason = wait_until(
            lambda: next(
                (
                    c
                    for c in (kube.get("InferenceGateway", NS, GW).get("status") or {}).get(
                        "conditions", []
                    )
                    if c["type"] == "Reconciled" and c["status"] == "False"
                ),
                None,
            ),
            what="Reconciled=False",
        )
        assert "blockOwnerDeletion" in reason["message"]
        assert kube.get("ServiceAccount", NS, CHILD) is None
    except BaseException:
        print(operator.output()[-10000:])
        raise
    finally:
        operator.stop()


# ---- #13.10: the gateway's Role, exercised as the gateway uses it --------------------------


def test_gateway_role_admits_its_get_and_watch_and_nothing_else(
    cluster: EmulatorThread, kube: Kube, operator: Operator
) -> None:
    kube.apply(gateway())
    wait_until(lambda: kube.get("Secret", NS, CONFIG), what="the config Secret")
    wait_until(lambda: kube.get("RoleBinding", NS, CHILD), what="the gateway's RoleBinding")
    pod = Kube(cluster.url, cluster.service_account_token(NS, CHILD))
    secrets = f"/api/v1/namespaces/{NS}/secrets"
    got = pod.http.get(f"{secrets}/{CONFIG}")
    assert got.status_code == 200, got.text
    rv = got.json()["metadata"]["resourceVersion"]
    # As services/gateway/tollgate_gateway/config_secret.py watches it.
    params = {
        "watch": "1",
        "fieldSelector": f"metadata.name={CONFIG}",
        "resourceVersion": rv,
        "timeoutSeconds": "1",
    }
    assert pod.http.get(secrets, params=params).status_code == 200
    assert pod.http.get(secrets).status_code == 403  # no list
    assert pod.http.get(f"{secrets}/other").status_code == 403
    other = {**params, "fieldSelector": "metadata.name=other"}
    assert pod.http.get(secrets, params=other).status_code == 403


# ---- #13.2: children are watched and restored ----------------------------------------------


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("Deployment", CHILD),
        ("Service", CHILD),
        ("Service", f"{CHILD}-metrics"),
        ("Secret", CONFIG),
        ("Role", CHILD),
        ("NetworkPolicy", CHILD),
    ],
)
def test_deleted_child_comes_back(kube: Kube, operator: Operator, kind: str, name: str) -> None:
    kube.apply(gateway())
    kube.apply(apikey("a"))
    wait_until(lambda: key_names(kube) == {"a"}, what="the config with key a")
    before = wait_until(lambda: kube.get(kind, NS, name), what=f"{kind} {name}")
    kube.delete(kind, NS, name)
    after = wait_until(lambda: kube.get(kind, NS, name), timeout=30, what=f"{kind} {name} back")
    assert after["metadata"]["uid"] != before["metadata"]["uid"]
    if kind == "Secret":
        assert key_names(kube) == {"a"}  # the same document, rewritten


def test_edited_child_is_put_back(kube: Kube, operator: Operator) -> None:
    kube.apply(gateway())
    wait_until(lambda: kube.get("Deployment", NS, CHILD), what="the Deployment")
    kube.patch(
        "Deployment", NS, CHILD, {"spec": {"template": {"spec": {"serviceAccountName": "x"}}}}
    )
    wait_until(
        lambda: (
            kube.get("Deployment", NS, CHILD)["spec"]["template"]["spec"]["serviceAccountName"]
            == CHILD
        ),
        timeout=30,
        what="the Deployment's pod spec restored",
    )


# ---- #13.5: an uninstall that ends ---------------------------------------------------------


def test_uninstall_and_namespace_deletion_end_without_the_operator(
    cluster: EmulatorThread, kube: Kube, start_operator: Callable[..., Operator]
) -> None:
    """`helm uninstall` removes the operator before the custom resources, and a namespace
    deletion removes everything: nothing may wait for an operator that is gone."""
    operator = start_operator()
    kube.apply(policy("standard", tokensPerDay=10))
    kube.apply(gateway(defaultPolicy="standard"))
    kube.apply(apikey("user-key"))  # the user's, not the chart's: it stays after uninstall
    kube.apply(
        {
            "apiVersion": "tollgate.dev/v1alpha1",
            "kind": "GPUExporter",
            "metadata": {"name": "gpus", "namespace": NS},
            "spec": {},
        }
    )
    wait_until(lambda: key_names(kube) == {"user-key"}, what="the key in the config")
    wait_until(lambda: kube.get("DaemonSet", NS, "gpus-gpu-exporter"), what="the DaemonSet")
    for kind in ("InferenceGateway", "ApiKey", "QuotaPolicy", "GPUExporter"):
        for obj in kube.list(kind, NS):
            assert not obj["metadata"].get("finalizers"), (kind, obj["metadata"])
    operator.stop()
    # helm uninstall: the chart's objects (gateway, policy, exporter) go; GC takes children.
    for kind, name in (
        ("InferenceGateway", GW),
        ("QuotaPolicy", "standard"),
        ("GPUExporter", "gpus"),
    ):
        kube.delete(kind, NS, name)
        assert kube.get(kind, NS, name) is None, f"{kind} {name} stuck"
    assert kube.get("Deployment", NS, CHILD) is None
    assert kube.get("Secret", NS, CONFIG) is None
    assert kube.get("DaemonSet", NS, "gpus-gpu-exporter") is None
    # Then the namespace, with the user's ApiKey (and its generated Secret) still in it.
    kube.delete("Namespace", None, NS)
    assert kube.get("Namespace", None, NS) is None, "the namespace is stuck Terminating"


# ---- #13.9: a referenced Secret must opt in ------------------------------------------------


def test_referenced_secret_must_opt_in(kube: Kube, operator: Operator) -> None:
    kube.apply(gateway())
    kube.apply(_secret("unlabelled", "sk-someone-elses-secret-value"))
    kube.apply(apikey("probe", secretRef={"name": "unlabelled"}))
    kube.apply(apikey("ghost", secretRef={"name": "does-not-exist"}))
    probe = wait_until(lambda: (c := ready(kube, "probe")) and c["reason"] != "Pending" and c)
    ghost = wait_until(lambda: (c := ready(kube, "ghost")) and c["reason"] != "Pending" and c)
    # A missing Secret and one that has not opted in look the same: no oracle.
    assert probe["reason"] == ghost["reason"] == "SecretUnavailable"
    assert probe["message"].replace("unlabelled", "X") == ghost["message"].replace(
        "does-not-exist", "X"
    )
    assert "fingerprint" not in (kube.get("ApiKey", NS, "probe").get("status") or {})
    assert key_names(kube) == set()

    kube.patch("Secret", NS, "unlabelled", {"metadata": {"labels": {OPT_IN_LABEL: "true"}}})
    wait_until(lambda: key_names(kube) == {"probe"}, what="the opted-in key accepted")
    assert (config(kube) or {})["keys"]


# ---- #13.16: status refresh without polling -------------------------------------------------


def test_key_status_refresh_reads_nothing_per_key(
    cluster: EmulatorThread, kube: Kube, operator: Operator
) -> None:
    """With a 1 s status interval, a quiet cluster sees no GET of any object by name: not
    of an ApiKey or its Secret, nor of a gateway, exporter or policy, their Deployment or
    DaemonSet, or the Secrets a gateway references. The timers use the bodies kopf
    watches; Secrets and children arrive by watch."""
    upstream_key = base64.b64encode(b"sk-upstream-secret-value").decode()
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "upstream", "namespace": NS},
            "data": {"api-key": upstream_key},
        }
    )
    kube.apply(policy("std", tokensPerDay=1000))
    kube.apply(
        gateway(
            defaultPolicy="std",
            upstream={"url": "http://vllm:8000", "apiKeySecretRef": {"name": "upstream"}},
        )
    )
    kube.apply(
        {
            "apiVersion": "tollgate.dev/v1alpha1",
            "kind": "GPUExporter",
            "metadata": {"name": "gpus", "namespace": NS},
            "spec": {},
        }
    )
    names = [f"k{i}" for i in range(5)]
    for name in names:
        kube.apply(apikey(name))
    wait_until(lambda: key_names(kube) == set(names), what="five keys in the config")
    wait_until(lambda: all((c := ready(kube, n)) and c["status"] == "True" for n in names))
    wait_until(lambda: _condition(kube, "InferenceGateway", "tollgate", "Reconciled") == "True")
    wait_until(lambda: _condition(kube, "GPUExporter", "gpus", "Ready"))
    wait_until(lambda: _condition(kube, "QuotaPolicy", "std", "InUse") == "True")
    # Status writes echo as watch events (and a gateway event re-checks its children):
    # reads that follow a change are fine. Wait until that has died down: polling never
    # does, and fails here.
    wait_until(
        lambda: _quiet_for(cluster, 2.0),
        timeout=30,
        what="two seconds without an operator request (but the Lease's)",
    )
    start = len(cluster.requests())
    time.sleep(5)  # an observation window of several status intervals, not a wait
    per_key = [
        r
        for r in cluster.requests()[start:]
        if r.method.value == "GET"
        and r.name is not None
        and r.resource is not None
        and r.resource.plural != "leases"  # leader election, by design
        and r.headers.get("User-Agent") != TEST_USER_AGENT
    ]
    assert per_key == [], [
        (r.method.value, r.resource and r.resource.plural, r.name, r.subresource)
        for r in _operator_requests(cluster, start)
    ]
    # #13.17: no INFO line per watch event or timer run.
    chatter = [
        line
        for line in operator.output().splitlines()
        if "INFO kopf.objects" in line and "succeeded." in line and "Handler '" in line
    ]
    assert chatter == [], chatter[:5]


def _operator_requests(cluster: EmulatorThread, start: int = 0) -> list[Any]:
    return [
        r
        for r in cluster.requests()[start:]
        if r.headers.get("User-Agent") != TEST_USER_AGENT
        and not (r.resource is not None and r.resource.plural == "leases")
        and r.params.get("watch") not in ("true", "1")
    ]


_seen: dict[int, tuple[int, float]] = {}


def _quiet_for(cluster: EmulatorThread, seconds: float) -> bool:
    """True once no operator request (but the Lease's and watches) arrived for `seconds`."""
    count = len(_operator_requests(cluster))
    last = _seen.get(id(cluster))
    now = time.monotonic()
    if last is None or last[0] != count:
        _seen[id(cluster)] = (count, now)
        return False
    return now - last[1] >= seconds


def _condition(kube: Kube, kind: str, name: str, type_: str) -> str | None:
    obj = kube.get(kind, NS, name) or {}
    for cond in (obj.get("status") or {}).get("conditions", []):
        if cond["type"] == type_:
            return str(cond["status"])
    return None
