"""Desired manifests of every child object, as pure functions of the parent's spec.

Pure so they are unit-testable and so that reconciling is "compute, compare, patch": the
builders never read the cluster. Every child carries the app.kubernetes.io labels and a
controller owner reference (with the parent's uid), so the garbage collector removes it with
its parent and `kubectl get` shows who made it.
"""

from __future__ import annotations

import base64
from typing import Any

from .settings import API_VERSION, MANAGED_BY, SETTINGS

CONFIG_KEY = "config.json"
CONFIG_DIR = "/etc/tollgate"
GATEWAY_PORT = 8080
EXPORTER_PORT = 9101
VERSION_ANNOTATION = "tollgate.dev/config-version"
GPU_SELECTOR = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]

Manifest = dict[str, Any]


# ---- names and labels ---------------------------------------------------------------------


def gateway_name(gateway: str) -> str:
    return f"{gateway}-gateway"


def config_secret_name(gateway: str) -> str:
    return f"{gateway}-gateway-config"


def key_secret_name(apikey: str) -> str:
    return f"{apikey}-key"


def exporter_name(exporter: str) -> str:
    return f"{exporter}-gpu-exporter"


def selector_labels(component: str, instance: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": f"tollgate-{component}",
        "app.kubernetes.io/instance": instance,
    }


def labels(component: str, instance: str) -> dict[str, str]:
    return {
        **selector_labels(component, instance),
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "tollgate",
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def owner_reference(kind: str, name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(name: str, namespace: str, owner: dict[str, Any], component: str, instance: str):
    return {
        "name": name,
        "namespace": namespace,
        "labels": labels(component, instance),
        "ownerReferences": [owner],
    }


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


_RESTRICTED_CONTAINER = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


# ---- InferenceGateway ---------------------------------------------------------------------


def config_secret(gw: Manifest, document: bytes, version: str) -> Manifest:
    name, ns = gw["metadata"]["name"], gw["metadata"]["namespace"]
    meta = _meta(config_secret_name(name), ns, _gw_owner(gw), "gateway", name)
    meta["annotations"] = {VERSION_ANNOTATION: version}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "type": "Opaque",
        "data": {CONFIG_KEY: _b64(document)},
    }


def _gw_owner(gw: Manifest) -> dict[str, Any]:
    return owner_reference("InferenceGateway", gw["metadata"]["name"], gw["metadata"]["uid"])


def gateway_service_account(gw: Manifest) -> Manifest:
    name, ns = gw["metadata"]["name"], gw["metadata"]["namespace"]
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(gateway_name(name), ns, _gw_owner(gw), "gateway", name),
    }


def gateway_role(gw: Manifest) -> Manifest:
    """Lets gateway pods watch their own config Secret (the fast revocation path), and
    nothing else: one Secret, by name, read-only."""
    name, ns = gw["metadata"]["name"], gw["metadata"]["namespace"]
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(gateway_name(name), ns, _gw_owner(gw), "gateway", name),
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["secrets"],
                "resourceNames": [config_secret_name(name)],
                "verbs": ["get", "list", "watch"],
            }
        ],
    }


def gateway_role_binding(gw: Manifest) -> Manifest:
    name, ns = gw["metadata"]["name"], gw["metadata"]["namespace"]
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(gateway_name(name), ns, _gw_owner(gw), "gateway", name),
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": gateway_name(name),
        },
        "subjects": [{"kind": "ServiceAccount", "name": gateway_name(name), "namespace": ns}],
    }


def _secret_env(var: str, ref: dict[str, Any], default_key: str) -> dict[str, Any]:
    return {
        "name": var,
        "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": ref.get("key") or default_key}},
    }


def gateway_deployment(gw: Manifest) -> Manifest:
    name, ns = gw["metadata"]["name"], gw["metadata"]["namespace"]
    spec = gw.get("spec", {})
    upstream = spec.get("upstream", {})
    drain = int(spec.get("drainSeconds", 30))
    delay = int(spec.get("shutdownDelaySeconds", 5))
    # One of url / urls / dnsName (the CRD requires exactly one).
    if upstream.get("dnsName"):
        env: list[dict[str, Any]] = [{"name": "VLLM_DNS_NAME", "value": upstream["dnsName"]}]
    elif upstream.get("urls"):
        env = [{"name": "VLLM_URLS", "value": ",".join(upstream["urls"])}]
    else:
        env = [{"name": "VLLM_URL", "value": upstream.get("url", "")}]
    if upstream.get("sessionAffinity", "off") != "off":
        env.append({"name": "GATEWAY_SESSION_AFFINITY", "value": upstream["sessionAffinity"]})
    if upstream.get("apiKeySecretRef"):
        env.append(_secret_env("VLLM_API_KEY", upstream["apiKeySecretRef"], "api-key"))
    if spec.get("servedModelName"):
        env.append({"name": "SERVED_MODEL_NAME", "value": spec["servedModelName"]})
    env += [
        {"name": "GATEWAY_PORT", "value": str(GATEWAY_PORT)},
        {"name": "GATEWAY_CONFIG_FILE", "value": f"{CONFIG_DIR}/{CONFIG_KEY}"},
        {"name": "GATEWAY_CONFIG_SECRET", "value": f"{ns}/{config_secret_name(name)}"},
        {"name": "GATEWAY_DRAIN_SECONDS", "value": str(drain)},
        {"name": "GATEWAY_SHUTDOWN_DELAY_SECONDS", "value": str(delay)},
    ]
    if spec.get("database", {}).get("urlSecretRef"):
        env.append(_secret_env("DATABASE_URL", spec["database"]["urlSecretRef"], "database-url"))
    container: dict[str, Any] = {
        "name": "gateway",
        "image": spec.get("image") or SETTINGS.gateway_image,
        "imagePullPolicy": spec.get("imagePullPolicy", "IfNotPresent"),
        "ports": [{"name": "http", "containerPort": GATEWAY_PORT, "protocol": "TCP"}],
        "env": env,
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 10,
            "timeoutSeconds": 3,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": "http"},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 2,
        },
        "resources": spec.get("resources")
        or {
            "requests": {"cpu": "250m", "memory": "128Mi"},
            "limits": {"memory": "512Mi"},
        },
        "securityContext": _RESTRICTED_CONTAINER,
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": gateway_name(name),
        # The drain must finish before the kubelet's SIGKILL.
        "terminationGracePeriodSeconds": drain + delay + 10,
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [
            {"name": "config", "secret": {"secretName": config_secret_name(name)}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if spec.get("imagePullSecrets"):
        pod_spec["imagePullSecrets"] = spec["imagePullSecrets"]
    if spec.get("nodeSelector"):
        pod_spec["nodeSelector"] = spec["nodeSelector"]
    if spec.get("tolerations"):
        pod_spec["tolerations"] = spec["tolerations"]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(gateway_name(name), ns, _gw_owner(gw), "gateway", name),
        "spec": {
            "replicas": int(spec.get("replicas", 2)),
            "selector": {"matchLabels": selector_labels("gateway", name)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": {
                # No config hash here on purpose: config changes reload in place.
                "metadata": {"labels": labels("gateway", name)},
                "spec": pod_spec,
            },
        },
    }


def gateway_service(gw: Manifest) -> Manifest:
    name, ns = gw["metadata"]["name"], gw["metadata"]["namespace"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(gateway_name(name), ns, _gw_owner(gw), "gateway", name),
        "spec": {
            "type": gw.get("spec", {}).get("service", {}).get("type", "ClusterIP"),
            "selector": selector_labels("gateway", name),
            "ports": [{"name": "http", "port": GATEWAY_PORT, "targetPort": "http"}],
        },
    }


def gateway_pdb(gw: Manifest) -> Manifest:
    name, ns = gw["metadata"]["name"], gw["metadata"]["namespace"]
    max_unavailable = gw.get("spec", {}).get("podDisruptionBudget", {}).get("maxUnavailable", 1)
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(gateway_name(name), ns, _gw_owner(gw), "gateway", name),
        "spec": {
            "maxUnavailable": max_unavailable,
            "selector": {"matchLabels": selector_labels("gateway", name)},
        },
    }


def gateway_service_monitor(gw: Manifest) -> Manifest:
    name, ns = gw["metadata"]["name"], gw["metadata"]["namespace"]
    interval = gw.get("spec", {}).get("monitoring", {}).get("interval", "30s")
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _meta(gateway_name(name), ns, _gw_owner(gw), "gateway", name),
        "spec": {
            "selector": {"matchLabels": selector_labels("gateway", name)},
            "endpoints": [{"port": "http", "path": "/metrics", "interval": interval}],
        },
    }


# ---- ApiKey -------------------------------------------------------------------------------


def key_secret(apikey: Manifest, data: dict[str, bytes], rotation_id: str | None) -> Manifest:
    name, ns = apikey["metadata"]["name"], apikey["metadata"]["namespace"]
    owner = owner_reference("ApiKey", name, apikey["metadata"]["uid"])
    meta = _meta(key_secret_name(name), ns, owner, "apikey", name)
    if rotation_id:
        meta["annotations"] = {"tollgate.dev/rotation-id": rotation_id}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "type": "Opaque",
        "data": {k: _b64(v) for k, v in data.items()},
    }


# ---- GPUExporter --------------------------------------------------------------------------


def _gx_owner(gx: Manifest) -> dict[str, Any]:
    return owner_reference("GPUExporter", gx["metadata"]["name"], gx["metadata"]["uid"])


def exporter_daemonset(gx: Manifest) -> Manifest:
    name, ns = gx["metadata"]["name"], gx["metadata"]["namespace"]
    spec = gx.get("spec") or {}
    pod_resources = spec.get("podResources") or {}
    with_pod_resources = pod_resources.get("enabled", True)
    socket_dir = pod_resources.get("hostPath", "/var/lib/kubelet/pod-resources")
    env: list[dict[str, Any]] = [
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "GPU_EXPORTER_PORT", "value": str(EXPORTER_PORT)},
        {"name": "GPU_EXPORTER_INTERVAL", "value": str(spec.get("intervalSeconds", 5))},
        {
            "name": "GPU_EXPORTER_POD_RESOURCES_SOCKET",
            "value": f"{socket_dir}/kubelet.sock" if with_pod_resources else "",
        },
    ]
    container: dict[str, Any] = {
        "name": "exporter",
        "image": spec.get("image") or SETTINGS.exporter_image,
        "imagePullPolicy": spec.get("imagePullPolicy", "IfNotPresent"),
        "ports": [{"name": "metrics", "containerPort": EXPORTER_PORT, "protocol": "TCP"}],
        "env": env,
        "livenessProbe": {"httpGet": {"path": "/health", "port": "metrics"}, "periodSeconds": 15},
        "readinessProbe": {"httpGet": {"path": "/health", "port": "metrics"}, "periodSeconds": 10},
        "resources": spec.get("resources")
        or {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        # The pod-resources socket is root-owned 0660 on most kubelets: reading it needs root.
        # Without it the exporter runs as nobody.
        "securityContext": {
            **_RESTRICTED_CONTAINER,
            "runAsNonRoot": not with_pod_resources,
            # Explicit: the image's own user (non-root) could not open the socket.
            "runAsUser": 0 if with_pod_resources else 65534,
        },
        "volumeMounts": [],
    }
    volumes: list[dict[str, Any]] = []
    if with_pod_resources:
        container["volumeMounts"].append(
            {"name": "pod-resources", "mountPath": socket_dir, "readOnly": True}
        )
        volumes.append(
            {"name": "pod-resources", "hostPath": {"path": socket_dir, "type": "Directory"}}
        )
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": _meta(exporter_name(name), ns, _gx_owner(gx), "gpu-exporter", name),
        "spec": {
            "selector": {"matchLabels": selector_labels("gpu-exporter", name)},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": labels("gpu-exporter", name)},
                "spec": {
                    "automountServiceAccountToken": False,
                    "nodeSelector": spec.get("nodeSelector") or GPU_SELECTOR,
                    "tolerations": spec.get("tolerations") or GPU_TOLERATIONS,
                    "priorityClassName": "system-node-critical",
                    "containers": [container],
                    "volumes": volumes,
                    **(
                        {"imagePullSecrets": spec["imagePullSecrets"]}
                        if spec.get("imagePullSecrets")
                        else {}
                    ),
                },
            },
        },
    }


def exporter_service(gx: Manifest) -> Manifest:
    name, ns = gx["metadata"]["name"], gx["metadata"]["namespace"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(exporter_name(name), ns, _gx_owner(gx), "gpu-exporter", name),
        "spec": {
            # Headless: Prometheus scrapes every node's pod, not a load-balanced one.
            "clusterIP": "None",
            "selector": selector_labels("gpu-exporter", name),
            "ports": [{"name": "metrics", "port": EXPORTER_PORT, "targetPort": "metrics"}],
        },
    }


def exporter_service_monitor(gx: Manifest) -> Manifest:
    name, ns = gx["metadata"]["name"], gx["metadata"]["namespace"]
    interval = (gx.get("spec") or {}).get("monitoring", {}).get("interval", "30s")
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _meta(exporter_name(name), ns, _gx_owner(gx), "gpu-exporter", name),
        "spec": {
            "selector": {"matchLabels": selector_labels("gpu-exporter", name)},
            "endpoints": [
                {
                    "port": "metrics",
                    "path": "/metrics",
                    "interval": interval,
                    # Keep the exporter's node label rather than the target's.
                    "honorLabels": True,
                }
            ],
        },
    }
