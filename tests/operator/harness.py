"""Test-side helpers: a tiny REST client for the emulator, the operator as a real process,
polling with deadlines."""

from __future__ import annotations

import base64
import functools
import os
import time
from pathlib import Path
from typing import Any

import httpx
import servers
from k8s_emulator import TEST_USER_AGENT, EmulatorThread
from servers import BIN, Process

# The tests poll the emulator every 50 ms: its request log is asserted on, so faster
# polling would only add noise to it.
wait_until = functools.partial(servers.wait_until, interval=0.05)

# (group/version, plural) for the kinds the tests touch.
KINDS = {
    "ApiKey": ("tollgate.dev/v1alpha1", "apikeys"),
    "QuotaPolicy": ("tollgate.dev/v1alpha1", "quotapolicies"),
    "InferenceGateway": ("tollgate.dev/v1alpha1", "inferencegateways"),
    "GPUExporter": ("tollgate.dev/v1alpha1", "gpuexporters"),
    "Secret": ("v1", "secrets"),
    "Service": ("v1", "services"),
    "ServiceAccount": ("v1", "serviceaccounts"),
    "Event": ("v1", "events"),
    "Deployment": ("apps/v1", "deployments"),
    "DaemonSet": ("apps/v1", "daemonsets"),
    "PodDisruptionBudget": ("policy/v1", "poddisruptionbudgets"),
    "Role": ("rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("rbac.authorization.k8s.io/v1", "rolebindings"),
    "ServiceMonitor": ("monitoring.coreos.com/v1", "servicemonitors"),
}


def path(kind: str, namespace: str | None, name: str | None = None, sub: str = "") -> str:
    gv, plural = KINDS[kind]
    base = f"/api/{gv}" if "/" not in gv else f"/apis/{gv}"
    if namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{plural}"
    if name:
        base += f"/{name}"
    if sub:
        base += f"/{sub}"
    return base


class Kube:
    """What a user with kubectl does, over HTTP (with a user agent the log can tell apart)."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, headers={"User-Agent": TEST_USER_AGENT}, timeout=10)

    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Create, or merge-patch when it exists (like `kubectl apply` for our purposes)."""
        kind, meta = manifest["kind"], manifest["metadata"]
        ns = meta.get("namespace", "default")
        response = self.http.post(path(kind, ns), json=manifest)
        if response.status_code == 409:
            response = self.http.patch(
                path(kind, ns, meta["name"]),
                json=manifest,
                headers={"Content-Type": "application/merge-patch+json"},
            )
        response.raise_for_status()
        return response.json()

    def patch(self, kind: str, ns: str, name: str, body: dict[str, Any], sub: str = "") -> dict:
        response = self.http.patch(
            path(kind, ns, name, sub),
            json=body,
            headers={"Content-Type": "application/merge-patch+json"},
        )
        response.raise_for_status()
        return response.json()

    def get(self, kind: str, ns: str | None, name: str) -> dict[str, Any] | None:
        response = self.http.get(path(kind, ns, name))
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.json()

    def list(self, kind: str, ns: str | None = None) -> list[dict[str, Any]]:
        response = self.http.get(path(kind, ns))
        response.raise_for_status()
        return response.json()["items"]

    def delete(self, kind: str, ns: str, name: str) -> None:
        response = self.http.delete(path(kind, ns, name))
        if response.status_code != 404:
            response.raise_for_status()

    def secret_data(self, ns: str, name: str, key: str) -> str | None:
        secret = self.get("Secret", ns, name)
        if secret is None or key not in (secret.get("data") or {}):
            return None
        return base64.b64decode(secret["data"][key]).decode()


class Operator(Process):
    """`tollgate-operator` as a child process pointed at the emulator."""

    def __init__(self, cluster: EmulatorThread, tmp: Path, **env: str) -> None:
        kubeconfig = cluster.write_kubeconfig(tmp / "kubeconfig")
        defaults: dict[str, str | None] = {
            "KUBECONFIG": str(kubeconfig),
            "KUBERNETES_SERVICE_HOST": None,  # never the in-cluster config
            "TOLLGATE_STATUS_INTERVAL": "1",
            "TOLLGATE_DEBOUNCE_SECONDS": "0.2",
            "TOLLGATE_DEBOUNCE_MAX_SECONDS": "0.6",
            "TOLLGATE_LOG_LEVEL": "DEBUG" if os.environ.get("TOLLGATE_TEST_DEBUG") else "INFO",
        }
        log_path = tmp / f"operator-{time.monotonic_ns()}.log"
        super().__init__([str(BIN / "tollgate-operator")], {**defaults, **env}, log_path)

    def alive(self) -> bool:
        return self.proc.poll() is None
