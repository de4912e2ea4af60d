"""The operator as a real process against the emulated API: children, keys, policies,
revocation, restarts, bursts. Every wait polls with a deadline."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from harness import Kube, Operator, wait_until
from k8s_emulator import TEST_USER_AGENT, EmulatorThread

from tollgate_operator.keys import OPT_IN_LABEL as OPT_IN

NS = "llm"
GW = "tollgate"
CONFIG = f"{GW}-gateway-config"
WRITE_METHODS = {"POST", "PATCH", "PUT", "DELETE"}


def gateway(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "tollgate.dev/v1alpha1",
        "kind": "InferenceGateway",
        "metadata": {"name": GW, "namespace": NS},
        "spec": {"upstream": {"url": "http://vllm:8000"}, "replicas": 2, **spec},
    }


def apikey(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "tollgate.dev/v1alpha1",
        "kind": "ApiKey",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"gateway": GW, **spec},
    }


def policy(name: str, **limits: int) -> dict[str, Any]:
    return {
        "apiVersion": "tollgate.dev/v1alpha1",
        "kind": "QuotaPolicy",
        "metadata": {"name": name, "namespace": NS},
        "spec": limits,
    }


def config(kube: Kube) -> dict[str, Any] | None:
    raw = kube.secret_data(NS, CONFIG, "config.json")
    return json.loads(raw) if raw else None


def key_names(kube: Kube) -> set[str]:
    doc = config(kube) or {"keys": {}}
    return {k["name"] for k in doc["keys"].values()}


def ready(kube: Kube, name: str) -> dict[str, Any] | None:
    obj = kube.get("ApiKey", NS, name)
    for cond in ((obj or {}).get("status") or {}).get("conditions", []):
        if cond["type"] == "Ready":
            return cond
    return None


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def operator_writes(cluster: EmulatorThread, since: int = 0) -> list[Any]:
    """The operator's writes, but its leader-election Lease (renewed every retry period by
    design)."""
    return [
        r
        for r in cluster.requests()[since:]
        if r.method.value in WRITE_METHODS
        and r.headers.get("User-Agent") != TEST_USER_AGENT
        and not (r.resource is not None and r.resource.plural == "leases")
    ]


def owner_uid(obj: dict[str, Any]) -> str:
    (ref,) = obj["metadata"]["ownerReferences"]
    assert ref["controller"] is True and ref["blockOwnerDeletion"] is True
    return ref["uid"]


# ---- InferenceGateway ---------------------------------------------------------------------


@pytest.mark.parametrize("cluster", [{"service_monitor": True}], indirect=True)
def test_gateway_children(kube: Kube, operator: Operator) -> None:
    gw = kube.apply(gateway(servedModelName="llama", database={"urlSecretRef": {"name": "db"}}))
    uid = gw["metadata"]["uid"]
    name = f"{GW}-gateway"
    kinds = ["Deployment", "Service", "PodDisruptionBudget", "ServiceAccount", "Role"]
    kinds += ["RoleBinding", "ServiceMonitor"]
    children = {k: wait_until(lambda k=k: kube.get(k, NS, name), what=k) for k in kinds}
    children["Secret"] = wait_until(lambda: kube.get("Secret", NS, CONFIG), what="config")
    for kind, child in children.items():
        assert owner_uid(child) == uid, kind
        labels = child["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == GW, kind
        assert labels["app.kubernetes.io/managed-by"] == "tollgate-operator", kind
        assert labels["app.kubernetes.io/part-of"] == "tollgate", kind

    pod = children["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["VLLM_URL"] == "http://vllm:8000"
    assert env["SERVED_MODEL_NAME"] == "llama"
    assert env["GATEWAY_PORT"] == "8080"
    assert env["GATEWAY_CONFIG_FILE"] == "/etc/tollgate/config.json"
    assert env["GATEWAY_CONFIG_SECRET"] == f"{NS}/{CONFIG}"
    assert env["DATABASE_URL"] == {"secretKeyRef": {"name": "db", "key": "database-url"}}
    assert container["image"] == "tollgate/gateway:0.1.0"
    assert container["ports"] == [
        {"name": "http", "containerPort": 8080, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 9090, "protocol": "TCP"},
    ]
    assert env["GATEWAY_METRICS_PORT"] == "9090"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert pod["terminationGracePeriodSeconds"] > int(env["GATEWAY_DRAIN_SECONDS"])
    assert pod["serviceAccountName"] == name
    assert {"name": "config", "secret": {"secretName": CONFIG}} in pod["volumes"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert children["Deployment"]["spec"]["replicas"] == 2

    (rule,) = children["Role"]["rules"]
    assert rule == {
        "apiGroups": [""],
        "resources": ["secrets"],
        "resourceNames": [CONFIG],
        "verbs": ["get", "watch"],  # no list: it cannot be limited to one name
    }
    assert children["RoleBinding"]["subjects"][0]["name"] == name
    assert children["Service"]["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http"}
    ]
    assert children["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == "metrics"
    document = config(kube) or {}
    # The contract may grow fields with empty defaults; these are the operator's.
    assert document["apiVersion"] == "tollgate.dev/v1alpha1"
    assert document["kind"] == "GatewayConfig"
    assert document["keys"] == {} and document["policies"] == {}

    # A referenced Secret that is missing is a condition with a reason (the pods could not
    # start), not a log line while status says Reconciled.
    def condition_reasons() -> dict[str, str]:
        status = kube.get("InferenceGateway", NS, GW).get("status") or {}
        return {c["type"]: c["reason"] for c in status.get("conditions", [])}

    wait_until(
        lambda: condition_reasons().get("Reconciled") == "SecretMissing",
        what="Reconciled=False SecretMissing for the database Secret",
    )
    db_url = base64.b64encode(b"postgresql://nobody@127.0.0.1:1/none").decode()
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "db", "namespace": NS},
            "data": {"database-url": db_url},
        }
    )

    # Updates propagate; status reports what the operator sees.
    kube.patch("InferenceGateway", NS, GW, {"spec": {"replicas": 3, "image": "gw:2"}})
    wait_until(lambda: kube.get("Deployment", NS, name)["spec"]["replicas"] == 3)
    dep = kube.get("Deployment", NS, name)
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "gw:2"
    kube.patch("Deployment", NS, name, {"status": {"replicas": 3, "readyReplicas": 3}})
    status = wait_until(
        lambda: (
            (st := kube.get("InferenceGateway", NS, GW).get("status") or {}).get("readyReplicas")
            == 3
            and condition_reasons().get("Reconciled") == "ChildrenReady"
            and st
        ),
        what="status: 3 ready, Reconciled",
    )
    assert status["keys"] == 0 and status["configVersion"]
    # The scale subresource's selector, for an HPA that targets the InferenceGateway.
    assert status["selector"] == (
        f"app.kubernetes.io/name=tollgate-gateway,app.kubernetes.io/instance={GW}"
    )
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Ready": "True",
        "Reconciled": "True",
    }


def test_gateway_without_service_monitor_crd(kube: Kube, operator: Operator) -> None:
    kube.apply(gateway(podDisruptionBudget={"enabled": False}))
    wait_until(lambda: kube.get("Deployment", NS, f"{GW}-gateway"))
    wait_until(lambda: kube.get("Secret", NS, CONFIG))
    assert kube.get("PodDisruptionBudget", NS, f"{GW}-gateway") is None
    # monitoring.coreos.com is not served: discovery said so, and nothing was tried.
    assert "servicemonitors" not in operator.output()


def test_gateway_replicas_from_dns_pull_secrets_and_service_type(
    kube: Kube, operator: Operator
) -> None:
    kube.apply(
        gateway(
            upstream={
                "dnsName": "vllm-headless.llm.svc.cluster.local:8000",
                "sessionAffinity": "key",
            },
            imagePullSecrets=[{"name": "registry-creds"}],
            service={"type": "NodePort"},
        )
    )
    name = f"{GW}-gateway"
    deployment = wait_until(lambda: kube.get("Deployment", NS, name))
    pod = deployment["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["VLLM_DNS_NAME"] == "vllm-headless.llm.svc.cluster.local:8000"
    assert "VLLM_URL" not in env
    assert env["GATEWAY_SESSION_AFFINITY"] == "key"
    assert pod["imagePullSecrets"] == [{"name": "registry-creds"}]
    assert wait_until(lambda: kube.get("Service", NS, name))["spec"]["type"] == "NodePort"

    # A merge patch: the DNS name is removed explicitly.
    urls = ["http://vllm-0:8000", "http://vllm-1:8000"]
    kube.apply(gateway(upstream={"urls": urls, "dnsName": None, "sessionAffinity": None}))
    wait_until(
        lambda: (
            {
                e["name"]: e.get("value")
                for e in kube.get("Deployment", NS, name)["spec"]["template"]["spec"]["containers"][
                    0
                ]["env"]
            }.get("VLLM_URLS")
            == "http://vllm-0:8000,http://vllm-1:8000"
        )
    )


def test_existing_child_of_someone_else_is_not_overwritten(kube: Kube, operator: Operator) -> None:
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"{GW}-gateway", "namespace": NS},
        "spec": {"ports": [{"port": 1}]},
    }
    kube.apply(service)
    kube.apply(gateway())

    def reconciled() -> dict[str, Any] | None:
        status = (kube.get("InferenceGateway", NS, GW) or {}).get("status") or {}
        return next((c for c in status.get("conditions", []) if c["type"] == "Reconciled"), None)

    cond = wait_until(lambda: (c := reconciled()) and c["status"] == "False" and c)
    assert "not owned" in cond["message"]
    assert kube.get("Service", NS, f"{GW}-gateway")["spec"]["ports"] == [{"port": 1}]
    events = wait_until(lambda: [e for e in kube.list("Event", NS) if e["type"] == "Warning"])
    assert any("not owned" in e["message"] for e in events)


# ---- ApiKey -------------------------------------------------------------------------------


def test_generated_key_reaches_config_as_hash_only(kube: Kube, operator: Operator) -> None:
    kube.apply(policy("standard", tokensPerDay=1000, requestsPerMinute=60))
    kube.apply(gateway())
    ak = kube.apply(apikey("team-a", policy="standard", models=["llama"]))
    key = wait_until(lambda: kube.secret_data(NS, "team-a-key", "key"), what="generated key")
    assert key.startswith("sk-tg-") and len(key) >= 40
    secret = kube.get("Secret", NS, "team-a-key")
    assert owner_uid(secret) == ak["metadata"]["uid"]

    doc = wait_until(lambda: (d := config(kube)) and d["keys"] and d)
    assert doc["keys"] == {
        sha(key): {"name": "team-a", "policy": "standard", "models": ["llama"], "disabled": False}
    }
    assert doc["policies"] == {"standard": {"tokensPerDay": 1000, "requestsPerMinute": 60}}
    raw = kube.get("Secret", NS, CONFIG)["data"]["config.json"]
    assert key not in base64.b64decode(raw).decode()

    cond = wait_until(lambda: (c := ready(kube, "team-a")) and c["status"] == "True" and c)
    assert cond["reason"] == "Active"
    status = kube.get("ApiKey", NS, "team-a")["status"]
    assert status["fingerprint"] == sha(key)[:12]
    assert status["policy"] == "standard" and status["secretName"] == "team-a-key"
    assert key not in json.dumps(kube.get("ApiKey", NS, "team-a"))
    events = wait_until(
        lambda: [e for e in kube.list("Event", NS) if e["reason"] == "KeyGenerated"]
    )
    assert events[0]["involvedObject"]["name"] == "team-a"


def test_disable_and_delete_revoke(kube: Kube, operator: Operator) -> None:
    kube.apply(gateway())
    kube.apply(apikey("a"))
    kube.apply(apikey("b"))
    wait_until(lambda: key_names(kube) == {"a", "b"})

    kube.patch("ApiKey", NS, "a", {"spec": {"disabled": True}})
    wait_until(lambda: key_names(kube) == {"b"}, timeout=5)
    wait_until(lambda: (c := ready(kube, "a")) and c["reason"] == "Disabled")
    kube.patch("ApiKey", NS, "a", {"spec": {"disabled": False}})
    wait_until(lambda: key_names(kube) == {"a", "b"}, timeout=5)

    kube.delete("ApiKey", NS, "b")
    # No finalizer: gone at once (a namespace deletion never waits for the operator),
    # its generated Secret with it (garbage collection), and revoked by the next write.
    assert kube.get("ApiKey", NS, "b") is None
    assert kube.get("Secret", NS, "b-key") is None
    wait_until(lambda: key_names(kube) == {"a"}, timeout=5, what="b out of the config")


def test_expired_key_is_left_out(kube: Kube, operator: Operator) -> None:
    kube.apply(gateway())
    kube.apply(apikey("old", expiresAt="2020-01-01T00:00:00Z"))
    kube.apply(apikey("new", expiresAt="2999-01-01T00:00:00Z"))
    doc = wait_until(lambda: (d := config(kube)) and d["keys"] and d)
    assert [k["name"] for k in doc["keys"].values()] == ["new"]
    assert next(iter(doc["keys"].values()))["expiresAt"] == "2999-01-01T00:00:00Z"
    wait_until(lambda: (c := ready(kube, "old")) and c["reason"] == "Expired")


def test_rotation_keeps_both_hashes_until_the_deadline(kube: Kube, operator: Operator) -> None:
    kube.apply(gateway())
    kube.apply(apikey("team-a"))
    first = wait_until(lambda: kube.secret_data(NS, "team-a-key", "key"))
    wait_until(lambda: sha(first) in (config(kube) or {}).get("keys", {}))

    until = "2999-01-01T00:00:00Z"
    kube.patch(
        "ApiKey", NS, "team-a", {"spec": {"rotation": {"id": "r1", "previousValidUntil": until}}}
    )
    second = wait_until(lambda: (k := kube.secret_data(NS, "team-a-key", "key")) != first and k)
    assert kube.secret_data(NS, "team-a-key", "previous") == first
    doc = wait_until(lambda: (d := config(kube)) and sha(second) in d["keys"] and d)
    entry = doc["keys"][sha(second)]
    assert entry["previousHash"] == sha(first)
    assert entry["previousValidUntil"] == until
    assert list(doc["keys"]) == [sha(second)]

    # Past the deadline, the old key is gone.
    kube.patch(
        "ApiKey",
        NS,
        "team-a",
        {"spec": {"rotation": {"previousValidUntil": "2020-01-01T00:00:00Z"}}},
    )
    wait_until(lambda: "previousHash" not in config(kube)["keys"][sha(second)])


def test_user_secret_is_read_never_written(kube: Kube, operator: Operator) -> None:
    kube.apply(gateway())
    mine = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "my-key", "namespace": NS, "labels": {OPT_IN: "true"}},
        "data": {"token": base64.b64encode(b"sk-user-provided-key-0001").decode()},
    }
    kube.apply(mine)
    kube.apply(apikey("own", secretRef={"name": "my-key", "key": "token"}))
    # A Secret named like a generated one, but not ours: left alone, the key unusable.
    squatter = {**mine, "metadata": {"name": "squat-key", "namespace": NS}}
    kube.apply(squatter)
    kube.apply(apikey("squat"))

    wait_until(lambda: sha("sk-user-provided-key-0001") in (config(kube) or {}).get("keys", {}))
    wait_until(lambda: (c := ready(kube, "squat")) and c["reason"] == "SecretConflict")
    assert key_names(kube) == {"own"}
    assert kube.get("Secret", NS, "my-key")["metadata"]["resourceVersion"]
    # A user's key shows no fingerprint (that would leak bits of its hash).
    assert "fingerprint" not in (kube.get("ApiKey", NS, "own").get("status") or {})
    for name in ("my-key", "squat-key"):
        assert kube.get("Secret", NS, name)["data"] == mine["data"]
        assert "ownerReferences" not in kube.get("Secret", NS, name)["metadata"]

    # The user edits their Secret: the timer notices and the config follows.
    new = base64.b64encode(b"sk-user-provided-key-0002").decode()
    kube.patch("Secret", NS, "my-key", {"data": {"token": new}})
    wait_until(lambda: sha("sk-user-provided-key-0002") in config(kube)["keys"])


# ---- QuotaPolicy --------------------------------------------------------------------------


def test_policy_change_reaches_every_gateway_using_it(kube: Kube, operator: Operator) -> None:
    kube.apply(policy("std", tokensPerDay=1000))
    kube.apply(gateway(defaultPolicy="std"))
    other = gateway()
    other["metadata"]["name"] = "other"
    kube.apply(other)
    kube.apply(apikey("a"))  # uses the default policy
    kube.apply({**apikey("b", policy="std"), "spec": {"gateway": "other", "policy": "std"}})

    def limits(secret: str) -> dict[str, Any] | None:
        raw = kube.secret_data(NS, secret, "config.json")
        return json.loads(raw)["policies"].get("std") if raw else None

    wait_until(lambda: limits(CONFIG) == {"tokensPerDay": 1000})
    wait_until(lambda: limits("other-gateway-config") == {"tokensPerDay": 1000})
    deployment = kube.get("Deployment", NS, f"{GW}-gateway")
    kube.patch("QuotaPolicy", NS, "std", {"spec": {"tokensPerDay": 5000, "requestsPerMinute": 10}})
    wanted = {"tokensPerDay": 5000, "requestsPerMinute": 10}
    wait_until(lambda: limits(CONFIG) == wanted, timeout=5)
    wait_until(lambda: limits("other-gateway-config") == wanted, timeout=5)
    # No restart: the Deployment's pod template did not change.
    assert kube.get("Deployment", NS, f"{GW}-gateway")["spec"] == deployment["spec"]
    status = wait_until(lambda: kube.get("QuotaPolicy", NS, "std").get("status") or {})
    wait_until(lambda: kube.get("QuotaPolicy", NS, "std")["status"].get("keys") == 2)
    assert status is not None


def test_missing_policy_fails_closed_and_deleting_one_in_use_is_not_blocked(
    kube: Kube, operator: Operator
) -> None:
    kube.apply(gateway())
    kube.apply(apikey("a", policy="gold"))
    wait_until(lambda: (c := ready(kube, "a")) and c["reason"] == "PolicyMissing")
    assert key_names(kube) == set()  # never silently unlimited

    kube.apply(policy("gold", tokensPerDay=10))
    wait_until(lambda: key_names(kube) == {"a"})
    wait_until(lambda: (c := ready(kube, "a")) and c["reason"] == "Active")
    assert not kube.get("QuotaPolicy", NS, "gold")["metadata"].get("finalizers")

    # No finalizer holds it: deleting a policy in use takes its keys out (fail-closed),
    # and the key says why; nothing waits for the operator.
    kube.delete("QuotaPolicy", NS, "gold")
    assert kube.get("QuotaPolicy", NS, "gold") is None
    wait_until(lambda: key_names(kube) == set(), what="the key out of the config")
    wait_until(lambda: (c := ready(kube, "a")) and c["reason"] == "PolicyMissing")
    assert not [e for e in kube.list("Event", NS) if e["reason"] == "PolicyInUse"]


# ---- GPUExporter --------------------------------------------------------------------------


@pytest.mark.parametrize("cluster", [{"service_monitor": True}], indirect=True)
def test_gpu_exporter_children(kube: Kube, operator: Operator) -> None:
    gx = kube.apply(
        {
            "apiVersion": "tollgate.dev/v1alpha1",
            "kind": "GPUExporter",
            "metadata": {"name": "gpus", "namespace": NS},
            "spec": {},
        }
    )
    name = "gpus-gpu-exporter"
    ds = wait_until(lambda: kube.get("DaemonSet", NS, name))
    svc = wait_until(lambda: kube.get("Service", NS, name))
    sm = wait_until(lambda: kube.get("ServiceMonitor", NS, name))
    for child in (ds, svc, sm):
        assert owner_uid(child) == gx["metadata"]["uid"]
    pod = ds["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["GPU_EXPORTER_POD_RESOURCES_SOCKET"].startswith("/var/lib/kubelet/pod-resources/")
    assert container["volumeMounts"] == [
        {"name": "pod-resources", "mountPath": "/var/lib/kubelet/pod-resources", "readOnly": True}
    ]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # The kubelet's socket is root-owned: reading it needs uid 0, said explicitly (the
    # image's default user is not root).
    assert container["securityContext"]["runAsUser"] == 0
    assert container["ports"][0]["containerPort"] == 9101
    assert svc["spec"]["clusterIP"] == "None"

    kube.patch("GPUExporter", NS, "gpus", {"spec": {"nodeSelector": {"gpu": "h100"}}})
    wait_until(
        lambda: (
            kube.get("DaemonSet", NS, name)["spec"]["template"]["spec"]["nodeSelector"]
            == {"gpu": "h100"}
        )
    )
    kube.patch("DaemonSet", NS, name, {"status": {"desiredNumberScheduled": 2, "numberReady": 2}})
    wait_until(
        lambda: (kube.get("GPUExporter", NS, "gpus").get("status") or {}).get("readyPods") == 2
    )


# ---- restarts, bursts ---------------------------------------------------------------------


def test_restart_against_unchanged_cluster_writes_nothing(
    cluster: EmulatorThread, kube: Kube, start_operator: Callable[..., Operator]
) -> None:
    first = start_operator()
    kube.apply(policy("std", tokensPerDay=10))
    kube.apply(gateway(defaultPolicy="std"))
    kube.apply(apikey("a"))
    kube.apply(apikey("b", disabled=True))
    kube.apply(apikey("c", policy="missing"))
    kube.apply(
        {
            "apiVersion": "tollgate.dev/v1alpha1",
            "kind": "GPUExporter",
            "metadata": {"name": "gpus", "namespace": NS},
        }
    )
    wait_until(lambda: key_names(kube) == {"a"})
    wait_until(lambda: all(ready(kube, n) for n in "abc"))
    # a (by the gateway's default) and b (disabled, but still assigned) use it.
    wait_until(lambda: (kube.get("QuotaPolicy", NS, "std").get("status") or {}).get("keys") == 2)
    wait_until(lambda: (kube.get("GPUExporter", NS, "gpus").get("status") or {}).get("conditions"))
    # Settled: a full status interval passes without writes.
    mark = len(cluster.requests())
    time.sleep(3)  # an observation window of three status intervals (timers run), not a wait
    assert operator_writes(cluster, mark) == []
    # Timers ran all along, but at INFO their every success is not logged.
    assert "Timer 'refresh' succeeded" not in first.output()
    first.stop()

    mark = len(cluster.requests())
    second = start_operator(TOLLGATE_LOG_LEVEL="DEBUG")  # DEBUG: timer runs are logged
    # Let it list, resume every object, run its timers and its writers' first pass.
    wait_until(lambda: "Resuming is processed" in second.output())
    wait_until(lambda: second.output().count("Timer 'refresh' succeeded") >= 12)
    writes = operator_writes(cluster, mark)
    assert writes == [], [(r.method.value, str(r.url), r.data) for r in writes]


def test_burst_of_keys_makes_few_config_writes(
    cluster: EmulatorThread, kube: Kube, operator: Operator
) -> None:
    kube.apply(gateway())
    wait_until(lambda: config(kube) is not None)
    mark = len(cluster.requests())
    for i in range(50):
        kube.apply(apikey(f"k{i:02d}"))
    wait_until(lambda: len(key_names(kube)) == 50, timeout=30)
    config_writes = [
        r for r in operator_writes(cluster, mark) if r.url.path.endswith(f"/secrets/{CONFIG}")
    ]
    assert 1 <= len(config_writes) <= 10, len(config_writes)
