"""The operator's own Kubernetes client: raw JSON over kubernetes_asyncio.

kopf watches and patches the tollgate.dev objects itself; everything else the operator reads
or writes (children, Secrets, status) goes through this one small class, so the set of
(group, resource, verb) it uses is visible in one place (see rbac.py) and every call is
async (never a blocking client on kopf's event loop). Dicts in, dicts out: the children are
built as plain manifests, and comparing dicts is what the reconciler needs.

Transient failures (connection errors, 429, 5xx) are retried here with a short backoff;
whatever still fails is raised to the handler, which turns it into a condition, an Event
and a kopf retry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger(__name__)

USER_AGENT = "tollgate-operator/0.1.0"
_RETRY_STATUSES = {429, 500, 502, 503, 504}
_BACKOFFS = (0.2, 0.5, 1.0)


@dataclass(frozen=True)
class Kind:
    """A resource as the REST API names it."""

    group: str  # "" for the core group
    version: str
    plural: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None, sub: str = "") -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace is not None:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{name}"
        if sub:
            base += f"/{sub}"
        return base


SECRETS = Kind("", "v1", "secrets")
SERVICES = Kind("", "v1", "services")
SERVICE_ACCOUNTS = Kind("", "v1", "serviceaccounts")
DEPLOYMENTS = Kind("apps", "v1", "deployments")
DAEMONSETS = Kind("apps", "v1", "daemonsets")
PDBS = Kind("policy", "v1", "poddisruptionbudgets")
NETWORK_POLICIES = Kind("networking.k8s.io", "v1", "networkpolicies")
ROLES = Kind("rbac.authorization.k8s.io", "v1", "roles")
ROLE_BINDINGS = Kind("rbac.authorization.k8s.io", "v1", "rolebindings")
SERVICE_MONITORS = Kind("monitoring.coreos.com", "v1", "servicemonitors")
PODS = Kind("", "v1", "pods")
# The Gateway API Inference Extension's pool of model-server pods (a third-party CRD).
INFERENCE_POOLS = Kind("inference.networking.k8s.io", "v1", "inferencepools")
API_KEYS = Kind("tollgate.dev", "v1alpha1", "apikeys")
QUOTA_POLICIES = Kind("tollgate.dev", "v1alpha1", "quotapolicies")
GATEWAYS = Kind("tollgate.dev", "v1alpha1", "inferencegateways")
GPU_EXPORTERS = Kind("tollgate.dev", "v1alpha1", "gpuexporters")


class ApiError(Exception):
    """A Kubernetes API error, with the HTTP status and the Status reason."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class KubeClient:
    def __init__(self, api: client.ApiClient) -> None:
        self._api = api
        self._discovery: dict[str, tuple[float, set[str]]] = {}

    @classmethod
    async def connect(cls) -> KubeClient:
        """In-cluster service account when there is one, else the kubeconfig."""
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            await config.load_kube_config()
        api = client.ApiClient()
        api.user_agent = USER_AGENT
        return cls(api)

    async def close(self) -> None:
        await self._api.close()

    # ---- verbs --------------------------------------------------------------------------

    async def get(self, kind: Kind, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return await self._call("GET", kind.path(namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def select(
        self, kind: Kind, namespace: str | None, labels: Mapping[str, str]
    ) -> list[dict[str, Any]]:
        """The objects whose labels include all of `labels` (an equality label selector,
        evaluated by the API server: only the matching objects travel)."""
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        doc = await self._call("GET", kind.path(namespace), query=[("labelSelector", selector)])
        items: list[dict[str, Any]] = doc.get("items") or []
        return items

    async def create(
        self, kind: Kind, namespace: str | None, body: dict[str, Any]
    ) -> dict[str, Any]:
        return await self._call("POST", kind.path(namespace), body)

    async def patch(
        self,
        kind: Kind,
        namespace: str | None,
        name: str,
        body: dict[str, Any],
        *,
        status: bool = False,
    ) -> dict[str, Any]:
        """JSON merge patch (RFC 7386): the same meaning on every kind, CRDs included."""
        path = kind.path(namespace, name, "status" if status else "")
        return await self._call("PATCH", path, body, "application/merge-patch+json")

    async def update(
        self, kind: Kind, namespace: str | None, name: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        """PUT (replace): with `metadata.resourceVersion` set, a 409 when it is stale."""
        return await self._call("PUT", kind.path(namespace, name), body)

    async def delete(self, kind: Kind, namespace: str | None, name: str) -> None:
        try:
            await self._call("DELETE", kind.path(namespace, name))
        except ApiError as exc:
            if exc.status != 404:
                raise

    async def version(self) -> dict[str, Any]:
        return await self._call("GET", "/version")

    async def served(self, kind: Kind, ttl: float) -> bool:
        """Whether the API server serves `kind` (discovery, cached for `ttl` seconds)."""
        key = kind.api_version
        cached = self._discovery.get(key)
        if cached is None or time.monotonic() - cached[0] > ttl:
            try:
                doc = await self._call("GET", kind.path().rsplit("/", 1)[0])
                names = {r.get("name", "") for r in doc.get("resources", [])}
            except ApiError as exc:
                if exc.status != 404:
                    raise
                names = set()
            cached = (time.monotonic(), names)
            self._discovery[key] = cached
        return kind.plural in cached[1]

    # ---- transport ----------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        content_type: str = "application/json",
        query: list[tuple[str, str]] | None = None,
    ) -> dict[str, Any]:
        for attempt in range(len(_BACKOFFS) + 1):
            try:
                return await self._once(method, path, body, content_type, query)
            except ApiError as exc:
                if exc.status not in _RETRY_STATUSES or attempt == len(_BACKOFFS):
                    raise
                log.warning("%s %s: %s; retrying", method, path, exc)
            except (aiohttp.ClientError, TimeoutError) as exc:
                if attempt == len(_BACKOFFS):
                    raise ApiError(503, "Unreachable", str(exc)) from exc
                log.warning("%s %s: %s; retrying", method, path, exc)
            await asyncio.sleep(_BACKOFFS[attempt])
        raise AssertionError("unreachable")

    async def _once(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        content_type: str,
        query: list[tuple[str, str]] | None,
    ) -> dict[str, Any]:
        try:
            data = await self._api.call_api(
                path,
                method,
                query_params=query,
                header_params={"Content-Type": content_type, "Accept": "application/json"},
                body=body,
                auth_settings=["BearerToken"],
                response_types_map={200: "object", 201: "object", 202: "object"},
                _return_http_data_only=True,
                _preload_content=True,
            )
        except ApiException as exc:
            raise _api_error(exc) from None
        return data if isinstance(data, dict) else {}


def _api_error(exc: ApiException) -> ApiError:
    reason, message = str(exc.reason or ""), str(exc.body or "")
    try:
        status_doc = json.loads(exc.body or "")
        reason = status_doc.get("reason") or reason
        message = status_doc.get("message") or message
    except (ValueError, TypeError, AttributeError):
        pass
    return ApiError(int(exc.status or 0), reason, message)
