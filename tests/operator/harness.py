"""Test-side helpers: a tiny REST client for the emulator, the operator as a real process
(authenticated as its ServiceAccount, authorized by the chart's own rendered RBAC), polling
with deadlines."""

from __future__ import annotations

import base64
import contextlib
import functools
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import servers
from k8s_emulator import ADMIN_TOKEN, TEST_USER_AGENT, EmulatorThread
from servers import BIN, Process, free_port

# The operator's identity: the chart's ServiceAccount in the release namespace.
OPERATOR_NAMESPACE = "tollgate"
OPERATOR_ACCOUNT = "tollgate-operator"
RBAC_KINDS = {"ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}

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
    "ClusterRole": ("rbac.authorization.k8s.io/v1", "clusterroles"),
    "ClusterRoleBinding": ("rbac.authorization.k8s.io/v1", "clusterrolebindings"),
    "NetworkPolicy": ("networking.k8s.io/v1", "networkpolicies"),
    "Namespace": ("v1", "namespaces"),
    "ConfigMap": ("v1", "configmaps"),
    "ServiceMonitor": ("monitoring.coreos.com/v1", "servicemonitors"),
    "Lease": ("coordination.k8s.io/v1", "leases"),
    "Pod": ("v1", "pods"),
    "InferencePool": ("inference.networking.k8s.io/v1", "inferencepools"),
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

    def __init__(self, url: str, token: str = ADMIN_TOKEN) -> None:
        headers = {"User-Agent": TEST_USER_AGENT, "Authorization": f"Bearer {token}"}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=10)

    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Create, or merge-patch when it exists (like `kubectl apply` for our purposes)."""
        kind, meta = manifest["kind"], manifest["metadata"]
        ns = meta.get("namespace", "default") if kind not in CLUSTER_SCOPED else None
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

    def delete(self, kind: str, ns: str | None, name: str, propagation: str | None = None) -> None:
        body = {"propagationPolicy": propagation} if propagation else None
        response = self.http.request("DELETE", path(kind, ns, name), json=body)
        if response.status_code != 404:
            response.raise_for_status()

    def secret_data(self, ns: str, name: str, key: str) -> str | None:
        secret = self.get("Secret", ns, name)
        if secret is None or key not in (secret.get("data") or {}):
            return None
        return base64.b64decode(secret["data"][key]).decode()


CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "Namespace"}


def operator_rbac(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The operator's ServiceAccount and RBAC exactly as the chart renders them."""
    from chart_support import render  # tests/chart (on sys.path via conftest)

    base: dict[str, Any] = {"gateway": {"enabled": False}, "quotaPolicies": {}}
    docs = render({**base, **(values or {})}, namespace=OPERATOR_NAMESPACE)
    return [d for d in docs if d["kind"] in RBAC_KINDS]


def install_operator_rbac(kube: Kube, values: dict[str, Any] | None = None) -> list[str]:
    """Apply the chart's operator RBAC; returns the namespaces it watches ([] = all)."""
    from chart_support import render

    base: dict[str, Any] = {"gateway": {"enabled": False}, "quotaPolicies": {}}
    for doc in operator_rbac(values):
        kube.apply(doc)
    docs = render({**base, **(values or {})}, namespace=OPERATOR_NAMESPACE)
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    env = {
        e["name"]: e.get("value")
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    return [n for n in (env.get("TOLLGATE_NAMESPACES") or "").split(",") if n]


class Operator(Process):
    """`tollgate-operator` as a child process pointed at the emulator, authenticated as
    the chart's operator ServiceAccount (so every request is authorized by the RBAC that
    is stored in the emulator, as on a real cluster)."""

    def __init__(
        self,
        cluster: EmulatorThread,
        tmp: Path,
        namespaces: list[str] | None = None,
        server: str | None = None,
        **env: str,
    ) -> None:
        token = cluster.service_account_token(OPERATOR_NAMESPACE, OPERATOR_ACCOUNT)
        # Each process has its own token: the request log tells two replicas apart by it.
        self.token = token
        kubeconfig = cluster.write_kubeconfig(
            tmp / f"kubeconfig-{time.monotonic_ns()}", token, server=server
        )
        defaults: dict[str, str | None] = {
            "KUBECONFIG": str(kubeconfig),
            "KUBERNETES_SERVICE_HOST": None,  # never the in-cluster config
            "TOLLGATE_NAMESPACES": ",".join(namespaces or []),
            # As the chart sets it (downward API): where the leader-election Lease lives.
            "TOLLGATE_OPERATOR_NAMESPACE": OPERATOR_NAMESPACE,
            "TOLLGATE_STATUS_INTERVAL": "1",
            "TOLLGATE_DEBOUNCE_SECONDS": "0.2",
            "TOLLGATE_DEBOUNCE_MAX_SECONDS": "0.6",
            "TOLLGATE_LOG_LEVEL": "DEBUG" if os.environ.get("TOLLGATE_TEST_DEBUG") else "INFO",
        }
        log_path = tmp / f"operator-{time.monotonic_ns()}.log"
        super().__init__([str(BIN / "tollgate-operator")], {**defaults, **env}, log_path)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def sent(self, cluster: EmulatorThread) -> list[Any]:
        """Every request this process sent (by its token)."""
        mine = f"Bearer {self.token}"
        return [r for r in cluster.requests() if r.headers.get("Authorization") == mine]


class TcpProxy:
    """A TCP forwarder to the emulator that can be cut (connections reset, port closed:
    connection refused, as an unreachable API server) and opened again."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.open()

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of a GET; (0, {}) when nothing answers."""
    try:
        response = httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return 0, {}
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, {}


def scrape(url: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}; {} when nothing answers."""
    try:
        text = httpx.get(url, timeout=5).text
    except httpx.HTTPError:
        return {}
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples
