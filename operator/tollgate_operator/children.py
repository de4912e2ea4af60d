"""Desired manifests of every child object, as pure functions of the parent's spec.

Pure so they are unit-testable and so that reconciling is "compute, compare, patch": the
builders never read the cluster. Every child carries the app.kubernetes.io labels and a
controller owner reference (with the parent's uid), so the garbage collector removes it with
its parent and `kubectl get` shows who made it.
"""

from __future__ import annotations

import base64
from typing import Any

from tollgate_contract import env as E
from tollgate_contract.config import CONFIG_SECRET_KEY

from .settings import API_VERSION, MANAGED_BY, SETTINGS

CONFIG_DIR = "/etc/tollgate"
GATEWAY_PORT = 8080
# Metrics (per-key labels) on their own port, never on the client-facing Service.
GATEWAY_METRICS_PORT = 9090
EXPORTER_PORT = 9101
VERSION_ANNOTATION = "tollgate.dev/config-version"
GPU_SELECTOR = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]

Manifest = dict[str, Any]


# ---- names and labels ---------------------------------------------------------------------


def gateway_name(gateway: str) -> str:
    return f"{gateway}-gateway"


def metrics_service_name(gateway: str) -> str:
    return f"{gateway}-gateway-metrics"


def upstream_policy_name(gateway: str) -> str:
    return f"{gateway}-gateway-upstream"


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


def _meta(
    name: str, namespace: str, owner: dict[str, Any], component: str, instance: str
) -> dict[str, Any]:
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
        "data": {CONFIG_SECRET_KEY: _b64(document)},
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
    """Lets gateway pods read and watch their own config Secret (the fast revocation path),
    and nothing else: one Secret, by name, get and watch (the gateway GETs it by name, then
    watches with a metadata.name field selector, which the API server authorizes against
    resourceNames). No list: a list cannot be limited to one name."""
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
                "verbs": ["get", "watch"],
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
    # One of url / urls / dnsName / inferencePool (the CRD requires exactly one). A pool's
    # replicas are in the config document (`upstreams`, which replace the gateway's own
    # default VLLM_URL): no upstream env at all.
    env: list[dict[str, Any]]
    if upstream.get("inferencePool"):
        env = []
    elif upstream.get("dnsName"):
        env = [{"name": E.VLLM_DNS_NAME, "value": upstream["dnsName"]}]
    elif upstream.get("urls"):
        env = [{"name": E.VLLM_URLS, "value": ",".join(upstream["urls"])}]
    else:
        env = [{"name": E.VLLM_URL, "value": upstream.get("url", "")}]
    if upstream.get("sessionAffinity", "off") != "off":
        env.append({"name": E.GATEWAY_SESSION_AFFINITY, "value": upstream["sessionAffinity"]})
    if upstream.get("apiKeySecretRef"):
        env.append(_secret_env(E.VLLM_API_KEY, upstream["apiKeySecretRef"], "api-key"))
    if spec.get("servedModelName"):
        env.append({"name": E.SERVED_MODEL_NAME, "value": spec["servedModelName"]})
    env += [
        {"name": E.GATEWAY_PORT, "value": str(GATEWAY_PORT)},
        {"name": E.GATEWAY_METRICS_PORT, "value": str(GATEWAY_METRICS_PORT)},
        {"name": E.GATEWAY_CONFIG_FILE, "value": f"{CONFIG_DIR}/{CONFIG_SECRET_KEY}"},
        {"name": E.GATEWAY_CONFIG_SECRET, "value": f"{ns}/{config_secret_name(name)}"},
        {"name": E.GATEWAY_DRAIN_SECONDS, "value": str(drain)},
        {"name": E.GATEWAY_SHUTDOWN_DELAY_SECONDS, "value": str(delay)},
    ]
    if spec.get("database", {}).get("urlSecretRef"):
        env.append(_secret_env(E.DATABASE_URL, spec["database"]["urlSecretRef"], "database-url"))
    container: dict[str, Any] = {
        "name": "gateway",
        "image": spec.get("image") or SETTINGS.gateway_image,
        "imagePullPolicy": spec.get("imagePullPolicy", "IfNotPresent"),
        "ports": [
            {"name": "http", "containerPort": GATEWAY_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": GATEWAY_METRICS_PORT, "protocol": "TCP"},
        ],
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
    for field in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        if spec.get(field):
            pod_spec[field] = spec[field]
    # Spread replicas over nodes by default, so one node going away takes at most one.
    pod_spec["topologySpreadConstraints"] = spec.get("topologySpreadConstraints") or [
        {
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": selector_labels("gateway", name)},
        }
    ]
    template_meta: dict[str, Any] = {
        "labels": {**(spec.get("podLabels") or {}), **labels("gateway", name)}
    }
    if spec.get("podAnnotations"):
        template_meta["annotations"] = dict(spec["podAnnotations"])
    deployment_spec: dict[str, Any] = {
        "selector": {"matchLabels": selector_labels("gateway", name)},
        "strategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
        },
        # No config hash here on purpose: config changes reload in place.
        "template": {"metadata": template_meta, "spec": pod_spec},
    }
    # With autoscaling the replica count belongs to the HPA (through the scale
    # subresource of the InferenceGateway): the Deployment follows spec.replicas.
    deployment_spec["replicas"] = int(spec.get("replicas", 2))
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(gateway_name(name), ns, _gw_owner(gw), "gateway", name),
        "spec": deployment_spec,
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
            # The API only: metrics are on gateway_metrics_service.
            "ports": [{"name": "http", "port": GATEWAY_PORT, "targetPort": "http"}],
        },
    }


def gateway_metrics_service(gw: Manifest) -> Manifest:
    """ClusterIP, whatever the API Service's type: metrics are never published with it."""
    name, ns = gw["metadata"]["name"], gw["metadata"]["namespace"]
    meta = _meta(metrics_service_name(name), ns, _gw_owner(gw), "gateway", name)
    meta["labels"]["tollgate.dev/metrics"] = "true"
    # Prometheus' job label (ServiceMonitor jobLabel): the API Service's name, as before.
    meta["labels"]["tollgate.dev/job"] = gateway_name(name)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels("gateway", name),
            "ports": [{"name": "metrics", "port": GATEWAY_METRICS_PORT, "targetPort": "metrics"}],
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
            # Pods that are not Ready (e.g. during an upstream outage) may always be
            # evicted: a node drain is never blocked by them.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def gateway_network_policy(gw: Manifest) -> Manifest:
    """The gateway pods accept the API port (from `apiFrom`, default anyone, like the
    Service) and the metrics port, nothing else. Egress stays open: vLLM, the quota store
    and the API server are wherever the cluster has them."""
    name, ns = gw["metadata"]["name"], gw["metadata"]["namespace"]
    netpol = (gw.get("spec") or {}).get("networkPolicy") or {}
    api_rule: dict[str, Any] = {"ports": [{"protocol": "TCP", "port": GATEWAY_PORT}]}
    if netpol.get("apiFrom"):
        api_rule["from"] = netpol["apiFrom"]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(gateway_name(name), ns, _gw_owner(gw), "gateway", name),
        "spec": {
            "podSelector": {"matchLabels": selector_labels("gateway", name)},
            "policyTypes": ["Ingress"],
            "ingress": [
                api_rule,
                {"ports": [{"protocol": "TCP", "port": GATEWAY_METRICS_PORT}]},
            ],
        },
    }


def upstream_network_policy(gw: Manifest) -> Manifest:
    """vLLM is never exposed directly: the pods `upstreamPodSelector` selects accept
    traffic only from this gateway's pods."""
    name, ns = gw["metadata"]["name"], gw["metadata"]["namespace"]
    selector = dict(((gw.get("spec") or {}).get("networkPolicy") or {})["upstreamPodSelector"])
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(upstream_policy_name(name), ns, _gw_owner(gw), "gateway", name),
        "spec": {
            "podSelector": {"matchLabels": selector},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": selector_labels("gateway", name)}}]}
            ],
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
            "jobLabel": "tollgate.dev/job",
            "selector": {
                "matchLabels": {**selector_labels("gateway", name), "tollgate.dev/metrics": "true"}
            },
            "endpoints": [{"port": "metrics", "path": "/metrics", "interval": interval}],
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
        # The NVIDIA container toolkit injects libnvidia-ml (and the device nodes) only into
        # containers that ask for it: without these the exporter sees no GPU.
        {"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"},
        {"name": "NVIDIA_DRIVER_CAPABILITIES", "value": "utility"},
    ]
    container: dict[str, Any] = {
        "name": "exporter",
        "image": spec.get("image") or SETTINGS.exporter_image,
        "imagePullPolicy": spec.get("imagePullPolicy", "IfNotPresent"),
        "ports": [{"name": "metrics", "containerPort": EXPORTER_PORT, "protocol": "TCP"}],
        "env": env,
        # /health fails only on a stuck collector (a restart may help); /ready also while
        # NVML is down or a GPU is stale, so a node exporting nothing is not Ready.
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": "metrics"},
            "initialDelaySeconds": 10,
            "periodSeconds": 20,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": "metrics"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
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
                    **_exporter_pod_options(spec),
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


def _exporter_pod_options(spec: Manifest) -> dict[str, Any]:
    """The optional pod fields: the runtime class that carries the NVIDIA hook ("nvidia"
    with the GPU operator; none where the toolkit is the default runtime), per-process
    memory (hostPID), a priority class, affinity."""
    options: dict[str, Any] = {}
    if spec.get("runtimeClassName"):
        options["runtimeClassName"] = spec["runtimeClassName"]
    if spec.get("hostPID"):
        options["hostPID"] = True
    if spec.get("priorityClassName"):
        options["priorityClassName"] = spec["priorityClassName"]
    if spec.get("affinity"):
        options["affinity"] = spec["affinity"]
    return options


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
