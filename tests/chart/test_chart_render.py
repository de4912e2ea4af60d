"""The chart renders, with default values and a matrix of the choices a user makes, into
what the install promises: safe pods, the right objects per choice, consistent names.

Everything here is `helm template` with the real helm binary: no cluster involved.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_support import (
    CHART,
    NAMESPACE,
    RELEASE,
    Manifest,
    helm,
    kinds,
    of_kind,
    one,
    pod_specs,
    render,
)

from tollgate_operator.settings import OperatorSettings

MONITORING_ON = {
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "dashboard": {"enabled": True},
}

# name -> values. Every case is rendered, linted and (test_chart_validate) schema-checked.
MATRIX: dict[str, dict[str, Any]] = {
    "default": {},
    "external-db-url": {
        "database": {
            "mode": "external",
            "external": {"url": "postgresql://tg:pw@db.example:5432/tollgate"},
        }
    },
    "external-db-secret": {
        "database": {"mode": "external", "external": {"existingSecret": {"name": "my-db"}}}
    },
    "no-db": {"database": {"mode": "none"}},
    "exporter": {"gpuExporter": {"enabled": True}},
    "monitoring": {"gpuExporter": {"enabled": True}, "monitoring": MONITORING_ON},
    "monitoring-no-exporter": {"monitoring": MONITORING_ON},
    "replicas": {"gateway": {"replicas": 6, "servedModelName": "llama-3-8b"}},
    "namespaced-operator": {"operator": {"watchNamespaces": [NAMESPACE, "llm"]}},
    "cluster-wide-operator": {"operator": {"clusterWide": True}},
    "exporter-own-namespace": {
        "gpuExporter": {"enabled": True, "namespace": "tollgate-gpu", "runtimeClassName": "nvidia"},
        "operator": {"watchNamespaces": [NAMESPACE, "tollgate-gpu"]},
    },
    "no-gateway": {"gateway": {"enabled": False}, "quotaPolicies": {"standard": None}},
    "ephemeral-db": {"database": {"embedded": {"persistence": {"enabled": False}}}},
    "registry": {"images": {"registry": "ghcr.io/acme", "tag": "1.2.3"}},
    "replicas-from-dns": {
        "images": {"pullSecrets": [{"name": "regcred"}]},
        "gpuExporter": {"enabled": True},
        "gateway": {
            "upstream": {
                "dnsName": "vllm-headless.llm.svc.cluster.local:8000",
                "sessionAffinity": "key",
            },
            "service": {"type": "NodePort"},
        },
    },
    "inference-pool": {"gateway": {"upstream": {"inferencePool": "vllm-pool"}}},
    "upstream-key": {
        "gateway": {
            "upstream": {"url": "https://vllm.llm.svc:8443/", "apiKeySecret": {"name": "vllm-key"}}
        }
    },
}


def _kind_counts(docs: list[Manifest]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for kind in kinds(docs):
        counts[kind] = counts.get(kind, 0) + 1
    return counts


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_helm_lint_strict_is_clean(case: str) -> None:
    result = helm("lint", "--strict", str(CHART), "-n", NAMESPACE, values=MATRIX[case])
    assert "0 chart(s) failed" in result.stdout, result.stdout
    # --strict turns warnings into failures; the one INFO (no icon) is all that may show.
    findings = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert findings == ["[INFO] Chart.yaml: icon is recommended"], findings


def test_default_render_has_the_promised_objects() -> None:
    docs = render()
    assert _kind_counts(docs) == {
        "ClusterRole": 2,  # aggregated into view/edit: users', not the operator's
        "Role": 2,  # the operator's, in the release namespace only, and its leader election
        "RoleBinding": 2,
        "NetworkPolicy": 1,  # Postgres; the gateway's are the operator's to create
        "Deployment": 1,  # the operator; the gateway's is the operator's to create
        "InferenceGateway": 1,
        "Pod": 1,  # the helm test hook
        "QuotaPolicy": 1,
        "Service": 2,  # Postgres, the operator's metrics
        "ServiceAccount": 1,
        "StatefulSet": 1,
    }
    gateway = one(docs, "InferenceGateway", RELEASE)
    assert gateway["spec"]["database"] == {
        "urlSecretRef": {"name": f"{RELEASE}-postgres", "key": "database-url"}
    }
    assert gateway["spec"]["defaultPolicy"] == "standard"
    assert one(docs, "QuotaPolicy", "standard")["spec"]["tokensPerDay"] == 2_000_000
    assert "GPUExporter" not in kinds(docs)


def test_replicas_from_dns_pull_secrets_and_service_type() -> None:
    docs = render(MATRIX["replicas-from-dns"])
    spec = one(docs, "InferenceGateway")["spec"]
    assert spec["upstream"] == {
        "dnsName": "vllm-headless.llm.svc.cluster.local:8000",
        "sessionAffinity": "key",
    }
    assert spec["service"] == {"type": "NodePort"}
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert one(docs, "GPUExporter")["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    operator = one(docs, "Deployment", f"{RELEASE}-operator")
    assert operator["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    urls = ["http://vllm-0:8000", "http://vllm-1:8000"]
    spec = one(render({"gateway": {"upstream": {"urls": urls}}}), "InferenceGateway")["spec"]
    assert spec["upstream"] == {"urls": urls}


def test_an_inference_pool_wins_over_the_default_url() -> None:
    spec = one(render(MATRIX["inference-pool"]), "InferenceGateway")["spec"]
    assert spec["upstream"] == {"inferencePool": {"name": "vllm-pool"}}


def test_default_images_are_the_operators_defaults() -> None:
    """The chart and the operator agree on image names and tags (and so does `make images`)."""
    docs = render()
    defaults = OperatorSettings()
    operator = one(docs, "Deployment", f"{RELEASE}-operator")
    container = operator["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["image"] == "tollgate/operator:0.1.0"
    assert env["TOLLGATE_GATEWAY_IMAGE"] == defaults.gateway_image == "tollgate/gateway:0.1.0"
    assert env["TOLLGATE_EXPORTER_IMAGE"] == defaults.exporter_image
    assert one(docs, "InferenceGateway")["spec"]["image"] == defaults.gateway_image
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert defaults.gateway_image.endswith(":" + chart["appVersion"])
    exporter = one(render(MATRIX["exporter"]), "GPUExporter")
    assert exporter["spec"]["image"] == defaults.exporter_image


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_every_pod_is_restricted_and_sized(case: str) -> None:
    """Non-root, read-only root filesystem, no capabilities, no privilege escalation,
    RuntimeDefault seccomp, and requests and limits on every container."""
    docs = render(MATRIX[case])
    specs = list(pod_specs(docs))
    assert specs
    for where, spec in specs:
        pod_security = spec.get("securityContext", {})
        assert pod_security.get("runAsNonRoot") is True, where
        assert pod_security.get("runAsUser", 0) > 0, where
        assert pod_security.get("seccompProfile") == {"type": "RuntimeDefault"}, where
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), where
        for container in spec.get("initContainers", []) + spec["containers"]:
            at = f"{where}/{container['name']}"
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, at
            assert security["readOnlyRootFilesystem"] is True, at
            assert security["capabilities"] == {"drop": ["ALL"]}, at
            assert security.get("privileged") is not True, at
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), at
            assert "memory" in resources["limits"], at
        for volume in spec.get("volumes", []):
            assert "hostPath" not in volume, where
    # The operator builds the gateway and exporter pods: their CRs must carry resources.
    for kind in ("InferenceGateway", "GPUExporter"):
        for cr in of_kind(docs, kind):
            assert cr["spec"]["resources"]["requests"] and cr["spec"]["resources"]["limits"]


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_every_object_is_labelled_and_in_the_release_namespace(case: str) -> None:
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding"}
    for doc in render(MATRIX[case]):
        meta = doc["metadata"]
        where = f"{doc['kind']}/{meta['name']}"
        assert meta["labels"]["app.kubernetes.io/part-of"] == "tollgate", where
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "Helm", where
        assert meta["labels"]["app.kubernetes.io/instance"] == RELEASE, where
        if doc["kind"] in cluster_scoped:
            assert "namespace" not in meta, where
        elif doc["kind"] in ("Role", "RoleBinding"):
            watched = MATRIX[case].get("operator", {}).get("watchNamespaces") or [NAMESPACE]
            assert meta["namespace"] in watched, where
        elif doc["kind"] == "GPUExporter":
            wanted = MATRIX[case].get("gpuExporter", {}).get("namespace") or NAMESPACE
            assert meta["namespace"] == wanted, where
        else:
            assert meta["namespace"] == NAMESPACE, where


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_secret_references_resolve(case: str) -> None:
    """Every Secret a pod or custom resource names is rendered, or is the user's own."""
    values = MATRIX[case]
    docs = render(values)
    rendered = {d["metadata"]["name"] for d in of_kind(docs, "Secret")}
    users = {"my-db", "vllm-key", f"{RELEASE}-postgres"}  # the last: the operator's
    referenced: set[str] = set()
    for _, spec in pod_specs(docs):
        for container in spec["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    referenced.add(ref["name"])
    for gateway in of_kind(docs, "InferenceGateway"):
        spec = gateway["spec"]
        if "database" in spec:
            referenced.add(spec["database"]["urlSecretRef"]["name"])
        if "apiKeySecretRef" in spec["upstream"]:
            referenced.add(spec["upstream"]["apiKeySecretRef"]["name"])
    assert referenced <= rendered | users, referenced - rendered


def test_database_choices() -> None:
    url = "postgresql://tg:pw@db.example:5432/tollgate"
    external = render(MATRIX["external-db-url"])
    assert "StatefulSet" not in kinds(external)
    secret = one(external, "Secret", f"{RELEASE}-database")
    assert secret["stringData"] == {"database-url": url}
    assert one(external, "InferenceGateway")["spec"]["database"]["urlSecretRef"] == {
        "name": f"{RELEASE}-database",
        "key": "database-url",
    }

    existing = render(MATRIX["external-db-secret"])
    assert "Secret" not in kinds(existing) and "StatefulSet" not in kinds(existing)
    assert one(existing, "InferenceGateway")["spec"]["database"]["urlSecretRef"] == {
        "name": "my-db",
        "key": "database-url",
    }

    none = render(MATRIX["no-db"])
    assert "database" not in one(none, "InferenceGateway")["spec"]
    assert "StatefulSet" not in kinds(none) and "Secret" not in kinds(none)

    ephemeral = one(render(MATRIX["ephemeral-db"]), "StatefulSet")
    assert "volumeClaimTemplates" not in ephemeral["spec"]
    assert {"name": "data", "emptyDir": {}} in ephemeral["spec"]["template"]["spec"]["volumes"]


def test_embedded_postgres_password_is_the_operators_to_make() -> None:
    """#13.11: no random value in the render (GitOps renders are stable); the operator is
    told which Secret to generate, once, and what its URL must say."""
    docs = render()
    assert not of_kind(docs, "Secret")
    first = helm("template", RELEASE, str(CHART), "-n", NAMESPACE).stdout
    assert helm("template", RELEASE, str(CHART), "-n", NAMESPACE).stdout == first
    operator = one(docs, "Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in operator["containers"][0]["env"]}
    assert env["TOLLGATE_POSTGRES_SECRET"] == f"{RELEASE}-postgres"
    assert env["TOLLGATE_POSTGRES_HOST"] == f"{RELEASE}-postgres.{NAMESPACE}.svc"
    assert env["TOLLGATE_POSTGRES_USER"] == env["TOLLGATE_POSTGRES_DB"] == "tollgate"
    statefulset = one(docs, "StatefulSet", f"{RELEASE}-postgres")
    assert (
        statefulset["spec"]["serviceName"]
        == one(docs, "Service", f"{RELEASE}-postgres")["metadata"]["name"]
    )
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    pod = statefulset["spec"]["template"]["spec"]
    assert pod["securityContext"]["fsGroup"] == 999
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    # The writable paths the official image needs under a read-only root filesystem.
    assert {"/var/lib/postgresql/data", "/var/run/postgresql", "/tmp"} <= mounts


def test_exporter_on_and_off() -> None:
    assert "GPUExporter" not in kinds(render())
    exporter = one(render(MATRIX["exporter"]), "GPUExporter", RELEASE)
    assert exporter["spec"]["podResources"] == {
        "enabled": True,
        "hostPath": "/var/lib/kubelet/pod-resources",
    }
    assert exporter["spec"]["monitoring"]["serviceMonitor"] is True


def test_replicas_and_model_reach_the_gateway() -> None:
    spec = one(render(MATRIX["replicas"]), "InferenceGateway")["spec"]
    assert spec["replicas"] == 6
    assert spec["servedModelName"] == "llama-3-8b"


def test_monitoring_flags() -> None:
    off = render()
    for kind in ("ServiceMonitor", "PrometheusRule", "ConfigMap"):
        assert kind not in kinds(off)
    # Off: the operator makes its own ServiceMonitor when the CRD exists.
    assert one(off, "InferenceGateway")["spec"]["monitoring"]["serviceMonitor"] is True

    on = render(MATRIX["monitoring"])
    monitors = {d["metadata"]["name"]: d for d in of_kind(on, "ServiceMonitor")}
    assert set(monitors) == {f"{RELEASE}-gateway", f"{RELEASE}-gpu-exporter", f"{RELEASE}-operator"}
    for monitor in monitors.values():
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # On: the chart's (labelled) ones replace the operator's, never both.
    assert one(on, "InferenceGateway")["spec"]["monitoring"]["serviceMonitor"] is False
    assert one(on, "GPUExporter")["spec"]["monitoring"]["serviceMonitor"] is False
    # They select the Services the operator creates (children.py's labels).
    assert monitors[f"{RELEASE}-gateway"]["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "tollgate-gateway",
        "app.kubernetes.io/instance": RELEASE,
        "tollgate.dev/metrics": "true",
    }
    # Metrics have their own port and Service; the job label stays the API Service's name.
    assert monitors[f"{RELEASE}-gateway"]["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitors[f"{RELEASE}-gateway"]["spec"]["jobLabel"] == "tollgate.dev/job"
    assert monitors[f"{RELEASE}-gpu-exporter"]["spec"]["endpoints"][0]["port"] == "metrics"

    only_gateway = render(MATRIX["monitoring-no-exporter"])
    assert sorted(d["metadata"]["name"] for d in of_kind(only_gateway, "ServiceMonitor")) == [
        f"{RELEASE}-gateway",
        f"{RELEASE}-operator",
    ]


def test_operator_children_match_the_chart_service_monitors() -> None:
    """The chart's ServiceMonitors select exactly what the operator's Services carry."""
    from tollgate_operator import children

    docs = render(MATRIX["monitoring"])
    gw = {"metadata": {"name": RELEASE, "namespace": NAMESPACE, "uid": "u"}, "spec": {}}
    service = children.gateway_metrics_service(gw)
    exporter = children.exporter_service(gw)
    monitors = {d["metadata"]["name"]: d for d in of_kind(docs, "ServiceMonitor")}
    gateway_monitor = monitors[children.gateway_name(RELEASE)]["spec"]
    selected = gateway_monitor["selector"]["matchLabels"]
    assert selected.items() <= service["metadata"]["labels"].items()
    assert service["metadata"]["labels"][gateway_monitor["jobLabel"]] == f"{RELEASE}-gateway"
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert gateway_monitor["endpoints"][0]["port"] in ports
    # The API Service is not selected: it carries no metrics.
    api = children.gateway_service(gw)
    assert not selected.items() <= api["metadata"]["labels"].items()
    assert (
        monitors[exporter["metadata"]["name"]]["spec"]["selector"]["matchLabels"]
        == (exporter["spec"]["selector"])
    )
    assert {p["name"] for p in service["spec"]["ports"]} == {"metrics"}
    assert {p["name"] for p in exporter["spec"]["ports"]} == {"metrics"}


def test_namespaced_operator_gets_roles_not_cluster_roles() -> None:
    docs = render(MATRIX["namespaced-operator"])
    assert "ClusterRoleBinding" not in kinds(docs)
    assert {r["metadata"]["name"] for r in of_kind(docs, "ClusterRole")} == {
        f"{RELEASE}-operator-view",
        f"{RELEASE}-operator-edit",
    }
    roles = {d["metadata"]["namespace"] for d in of_kind(docs, "Role")}
    bindings = {d["metadata"]["namespace"] for d in of_kind(docs, "RoleBinding")}
    assert roles == bindings == {NAMESPACE, "llm"}
    operator = one(docs, "Deployment", f"{RELEASE}-operator")
    env = {
        e["name"]: e.get("value")
        for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["TOLLGATE_NAMESPACES"] == f"{NAMESPACE},llm"


def test_without_a_gateway_only_the_operator_is_installed() -> None:
    docs = render(MATRIX["no-gateway"])
    assert not {"InferenceGateway", "QuotaPolicy", "Pod"} & set(kinds(docs))
    assert one(docs, "Deployment", f"{RELEASE}-operator")


def test_registry_and_tag_apply_to_every_tollgate_image() -> None:
    docs = render(MATRIX["registry"])
    operator = one(docs, "Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in operator["containers"][0]["env"]}
    assert operator["containers"][0]["image"] == "ghcr.io/acme/tollgate/operator:1.2.3"
    assert env["TOLLGATE_GATEWAY_IMAGE"] == "ghcr.io/acme/tollgate/gateway:1.2.3"
    assert env["TOLLGATE_EXPORTER_IMAGE"] == "ghcr.io/acme/tollgate/gpu-exporter:1.2.3"
    assert one(docs, "InferenceGateway")["spec"]["image"] == "ghcr.io/acme/tollgate/gateway:1.2.3"
    assert (
        one(docs, "Pod")["spec"]["containers"][0]["image"] == "ghcr.io/acme/tollgate/gateway:1.2.3"
    )


def test_operator_replicas_lead_by_lease() -> None:
    """One leader by Lease: any replica count, rolled with a surge (the new pod stands by
    until the old one releases the Lease); liveness and metrics on their own ports."""
    spec = one(render(), "Deployment", f"{RELEASE}-operator")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    container = spec["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["port"] == "health"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 8081, "metrics": 9102}
    env = {e["name"]: e for e in container["env"]}
    assert env["TOLLGATE_LIVENESS"]["value"] == "http://0.0.0.0:8081/healthz"
    assert env["TOLLGATE_METRICS"]["value"] == "http://0.0.0.0:9102/metrics"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["TOLLGATE_OPERATOR_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.namespace"
    )
    two = one(render({"operator": {"replicas": 2}}), "Deployment", f"{RELEASE}-operator")
    assert two["spec"]["replicas"] == 2
    service = one(render(), "Service", f"{RELEASE}-operator-metrics")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9102, "targetPort": "metrics", "protocol": "TCP"}
    ]
    labels = spec["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())


def test_operator_service_monitor_only_when_enabled() -> None:
    assert not [
        d
        for d in render()
        if d["kind"] == "ServiceMonitor" and d["metadata"]["name"] == f"{RELEASE}-operator"
    ]
    docs = render({"monitoring": {"serviceMonitor": {"enabled": True, "labels": {"r": "x"}}}})
    monitor = one(docs, "ServiceMonitor", f"{RELEASE}-operator")
    service = one(docs, "Service", f"{RELEASE}-operator-metrics")
    assert monitor["metadata"]["labels"]["r"] == "x"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert all(service["metadata"]["labels"].get(k) == v for k, v in selector.items())


def test_helm_test_hook_calls_ready_through_the_service() -> None:
    pod = one(render(), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    assert env["READY_URL"] == f"http://{RELEASE}-gateway.{NAMESPACE}.svc:8080/ready"
    assert pod["spec"]["restartPolicy"] == "Never"
    assert "Pod" not in kinds(render({"tests": {"enabled": False}}))


def test_helm_test_script_waits_for_ready() -> None:
    """Run the hook's own script against a local /ready that turns ready on the 2nd call."""
    import subprocess
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    calls: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            calls.append(self.path)
            ready = len(calls) >= 2
            body = json.dumps({"status": "ready"} if ready else {"error": {"message": "no"}})
            self.send_response(200 if ready else 503)
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        container = one(render(), "Pod")["spec"]["containers"][0]
        url = f"http://127.0.0.1:{server.server_port}/ready"
        result = subprocess.run(
            [sys.executable, "-c", container["args"][0]],
            env={"READY_URL": url, "TIMEOUT": "20"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert calls == ["/ready", "/ready"]
        failing = subprocess.run(
            [sys.executable, "-c", container["args"][0]],
            env={"READY_URL": "http://127.0.0.1:1/ready", "TIMEOUT": "0"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert failing.returncode == 1 and "not ready within 0 s" in failing.stdout
    finally:
        server.shutdown()


def test_kube_version_constraint() -> None:
    """Chart.yaml's kubeVersion is enforced: the oldest claimed version renders, older not."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == ">=1.29.0-0"
    helm("template", RELEASE, str(CHART), "--kube-version", "1.29.0")
    old = helm("template", RELEASE, str(CHART), "--kube-version", "1.28.9", check=False)
    assert old.returncode != 0 and "kubeVersion" in old.stderr


def test_notes_walk_a_newcomer_through_the_first_key() -> None:
    result = helm("install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client", values={})
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "kind: ApiKey" in notes
    assert "get secret my-first-key-key -o jsonpath='{.data.key}' | base64 -d" in notes
    assert f"port-forward service/{RELEASE}-gateway 8080:8080" in notes
    assert "/v1/chat/completions" in notes and f"helm test {RELEASE}" in notes
    # A heredoc terminator must start its line, or a pasted command never ends.
    assert "\nYAML\n" in notes


def test_dashboard_and_rules_come_from_deploy_monitoring() -> None:
    """The ConfigMap holds the dashboard byte for byte (trimmed) and the PrometheusRule the
    alert groups of files/monitoring (= deploy/monitoring), plus the chart's target alerts."""
    docs = render(MATRIX["monitoring"])
    dashboard_file = CHART / "files" / "monitoring" / "grafana-dashboard.json"
    rules_file = CHART / "files" / "monitoring" / "alerts.yaml"
    assert dashboard_file.exists(), (
        f"{dashboard_file} is missing: charts/tollgate/files/monitoring must be (or link to) "
        "deploy/monitoring"
    )
    assert rules_file.exists(), f"{rules_file} is missing (see above)"
    config_map = one(docs, "ConfigMap", f"{RELEASE}-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["tollgate.json"]) == json.loads(dashboard_file.read_text())
    rule = one(docs, "PrometheusRule")
    groups = yaml.safe_load(rules_file.read_text())["groups"]
    assert rule["spec"]["groups"][: len(groups)] == groups
    (extra,) = rule["spec"]["groups"][len(groups) :]
    assert [r["alert"] for r in extra["rules"]] == [
        "TollgateGatewayTargetDown",
        "TollgateGPUExporterTargetDown",
    ]
    # The dashboard ConfigMap stays well under the 1 MiB object limit (and kubectl's
    # 256 KiB last-applied annotation).
    assert len(config_map["data"]["tollgate.json"]) < 256 * 1024


@pytest.mark.parametrize(
    ("flag", "missing"),
    [("dashboard", "grafana-dashboard.json"), ("prometheusRule", "alerts.yaml")],
)
def test_monitoring_flags_name_missing_files(tmp_path: Path, flag: str, missing: str) -> None:
    """Without files/monitoring (the link to deploy/monitoring), turning a flag on fails
    the render and says which file is missing and where it should come from."""
    chart = tmp_path / "tollgate"
    shutil.copytree(CHART, chart, symlinks=True, ignore=shutil.ignore_patterns("files"))
    helm("template", RELEASE, str(chart))  # flags off: fine without the files
    result = helm(
        "template",
        RELEASE,
        str(chart),
        values={"monitoring": {flag: {"enabled": True}}},
        check=False,
    )
    assert result.returncode != 0
    assert f"files/monitoring/{missing} is missing from the chart" in result.stderr
    assert "deploy/monitoring" in result.stderr
