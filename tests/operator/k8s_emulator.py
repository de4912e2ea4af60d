"""The Kubernetes API emulator the operator tests run against: kmock 0.8, fixed up.

kmock (by kopf's author) serves the Kubernetes REST API from memory. As shipped (0.8) it
cannot carry a kopf operator past its first finalizer; every gap closed here is marked
`GAP:` with what the real API server does instead. Everything lives in this one module, and
it touches kmock internals, so kmock is pinned (==0.8).

Strict where a real API server is strict (each marked `STRICT:`):
- authentication by bearer token and RBAC authorization against the Role/ClusterRole
  objects stored here (the chart's own, applied by the tests): a missing verb is a 403;
  watches and lists with a `metadata.name` field selector are authorized by resourceNames;
  RBAC escalation prevention on Role and RoleBinding writes;
- owner-reference permission enforcement: blockOwnerDeletion needs `update` on
  `<owner>/finalizers`;
- garbage collection of dependents (background, foreground, orphan) and namespace
  deletion (objects with finalizers keep a namespace Terminating), NamespaceLifecycle
  (no creates in a missing or terminating namespace);
- CRD schema and CEL validation on create and update (crd_validation.py, with the CRDs as
  they ship), and DNS name rules for Services (DNS-1035) and other objects.

What stays unemulated (the `cluster` tests and kind/e2e.sh cover it): controllers (no pods
unless a test creates them, no readyReplicas unless a test writes them), defaulting, pruning
of unknown fields, strategic-merge-patch list merging, set-based label selectors (`in`,
`notin`: refused with 400; equality and existence selectors are served).

The emulator runs in a thread with its own event loop, so tests stay synchronous and the
operator under test is a real process talking HTTP to it.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import datetime
import itertools
import json
import re
import secrets
import threading
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp.web
import crd_validation
import jsonpatch
import kmock
import yaml
from k8s_rbac import RBAC, Attributes, Authorizer, User, service_account
from kmock._internal import enums, parsing, rendering

CRD_DIR = Path(__file__).resolve().parents[2] / "charts" / "tollgate" / "crds"
# Third-party CRDs a user may have installed (never shipped by the chart): registered on
# request, as on a cluster that has them.
THIRD_PARTY_CRD_DIR = Path(__file__).resolve().parent / "third_party_crds"
INFERENCE_POOL_CRD = THIRD_PARTY_CRD_DIR / "inferencepools.inference.networking.k8s.io.yaml"
TEST_USER_AGENT = "tollgate-tests"
# The tests (and kubectl in them) are cluster admins; every other client gets a token for
# its own identity (EmulatorThread.token_for).
ADMIN_TOKEN = "emulator-admin-token"
ADMIN = User("tests-admin", ("system:masters", "system:authenticated"))
ANONYMOUS = User("system:anonymous", ("system:unauthenticated",))
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
# What the request's authenticated user is, for the checks made deeper in a verb.
_USER: contextvars.ContextVar[User] = contextvars.ContextVar("user", default=ADMIN)

# Built-in kinds the operator (and kopf) may touch: (group/version, plural, kind, namespaced).
BUILTIN = [
    ("v1", "secrets", "Secret", True),
    ("v1", "services", "Service", True),
    ("v1", "serviceaccounts", "ServiceAccount", True),
    ("v1", "events", "Event", True),
    ("v1", "configmaps", "ConfigMap", True),
    ("v1", "namespaces", "Namespace", False),
    ("networking.k8s.io/v1", "networkpolicies", "NetworkPolicy", True),
    ("rbac.authorization.k8s.io/v1", "clusterroles", "ClusterRole", False),
    ("rbac.authorization.k8s.io/v1", "clusterrolebindings", "ClusterRoleBinding", False),
    ("apps/v1", "statefulsets", "StatefulSet", True),
    ("events.k8s.io/v1", "events", "Event", True),
    ("apps/v1", "deployments", "Deployment", True),
    ("apps/v1", "daemonsets", "DaemonSet", True),
    ("policy/v1", "poddisruptionbudgets", "PodDisruptionBudget", True),
    ("rbac.authorization.k8s.io/v1", "roles", "Role", True),
    ("rbac.authorization.k8s.io/v1", "rolebindings", "RoleBinding", True),
    # Leader election. Updates carry the resourceVersion read; a stale one is 409 Conflict
    # (enforced for every kind in _update, as the real API server does).
    ("coordination.k8s.io/v1", "leases", "Lease", True),
]
SERVICE_MONITOR = ("monitoring.coreos.com/v1", "servicemonitors", "ServiceMonitor", True)
# Pods: created by the tests (no controller makes them), their status written through the
# status subresource as a kubelet does.
POD = ("v1", "pods", "Pod", True)
ALL_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


# GAP: `/api/v1/namespaces` and `/api/v1/namespaces/NAME` are misparsed (the namespace
# segment is taken as a namespace filter, and unpacking fails with HTTP 500). The real API
# treats them as the cluster-scoped `namespaces` resource.
_original_parse_path = parsing.parse_path
_NAMESPACE_PATH = re.compile(r"^/api/v1/namespaces(?:/([^/]+))?/?$")


def _parse_path(path: str) -> parsing.ParsedPath:
    match = _NAMESPACE_PATH.match(path)
    if match:
        return parsing.ParsedPath("", "v1", "namespaces", None, match.group(1), None)
    return _original_parse_path(path)


parsing.parse_path = _parse_path


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# GAP: error `reason`s must be the canonical ones (kopf and kubectl branch on them).
class ApiError(kmock.KubernetesError):
    pass


def _error(status: int, reason: str, message: str) -> ApiError:
    return ApiError(status=status, reason=reason, message=message, details={})


@dataclass
class _Stored:
    obj: dict[str, Any]


class Emulator(kmock.KubernetesEmulator):
    """kmock's KubernetesEmulator with the object semantics of a real API server."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._store: dict[tuple[str, str], dict[tuple[str | None, str], dict[str, Any]]] = (
            defaultdict(dict)
        )
        # GAP: no resourceVersion at all. One cluster-wide counter, like etcd's revision.
        self._revision = itertools.count(1)
        self._last_rv = 0
        # GAP: watches replay everything as ADDED and ignore ?resourceVersion=. Keep every
        # event so a watch resumes exactly after the version it names.
        self._events: dict[tuple[str, str], list[tuple[int, dict[str, Any]]]] = defaultdict(list)
        self._watchers: dict[tuple[str, str], set[asyncio.Queue[dict[str, Any]]]] = defaultdict(set)
        self._status_subresource: set[tuple[str, str]] = set()
        self._namespaced: dict[tuple[str, str], bool] = {}
        self._kinds: dict[tuple[str, str], tuple[str, str]] = {}
        self._mutex = asyncio.Lock()
        # STRICT: tokens, RBAC, CRD schemas.
        self.tokens: dict[str, User] = {ADMIN_TOKEN: ADMIN}
        self.authorizer = Authorizer(self._store)
        self._schemas: dict[tuple[str, str], dict[str, Any]] = {}
        self._plurals: dict[tuple[str, str], str] = {}  # (group/version, kind) -> plural

    # ---- registration -------------------------------------------------------------------

    def register(
        self,
        group_version: str,
        plural: str,
        kind: str,
        namespaced: bool,
        *,
        status: bool = False,
        short_names: Iterable[str] = (),
        categories: Iterable[str] = (),
    ) -> None:
        # GAP (documented, not a bug): discovery lists only what is registered, and an empty
        # verb set makes kopf ignore a resource.
        group, _, version = group_version.rpartition("/")
        info = self.resources[kmock.resource(group, version, plural)]
        info.kind = kind
        info.singular = kind.lower()
        info.namespaced = namespaced
        info.verbs = set(ALL_VERBS)
        info.shortnames = set(short_names)
        info.categories = set(categories)
        if status:
            info.subresources = {"status"}
            self._status_subresource.add((group, plural))
        self._namespaced[(group, plural)] = namespaced
        self._kinds[(group, plural)] = (group_version, kind)
        self._plurals[(group_version, kind)] = plural

    def register_crds(self, crd_dir: Path = CRD_DIR) -> list[dict[str, Any]]:
        """Register every CRD in the chart's crds/ folder, the files as they ship."""
        return [self.register_crd(path) for path in sorted(crd_dir.glob("*.yaml"))]

    def register_crd(self, path: Path) -> dict[str, Any]:
        """One CRD file: its kind served, its schema and CEL rules enforced on writes."""
        crd: dict[str, Any] = yaml.safe_load(path.read_text())
        spec = crd["spec"]
        for version in spec["versions"]:
            self.register(
                f"{spec['group']}/{version['name']}",
                spec["names"]["plural"],
                spec["names"]["kind"],
                spec["scope"] == "Namespaced",
                status="status" in version.get("subresources", {}),
                short_names=spec["names"].get("shortNames", ()),
                categories=spec["names"].get("categories", ()),
            )
            self._schemas[(spec["group"], spec["names"]["plural"])] = version["schema"][
                "openAPIV3Schema"
            ]
        return crd

    def register_builtins(self, *, service_monitor: bool = False) -> None:
        for entry in [*BUILTIN, *([SERVICE_MONITOR] if service_monitor else [])]:
            self.register(*entry)
        self.register(*POD, status=True)

    # ---- discovery ----------------------------------------------------------------------

    async def _serve_version(self, request: rendering.Request) -> rendering.Payload:
        payload = await super()._serve_version(request)
        # GAP: core discovery says groupVersion "/v1" (breaks kubectl and helm).
        if isinstance(payload, dict) and payload.get("groupVersion", "").startswith("/"):
            payload["groupVersion"] = payload["groupVersion"][1:]
        return payload

    # ---- errors -------------------------------------------------------------------------

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if isinstance(exc, ApiError):
            return aiohttp.web.json_response(
                {
                    "apiVersion": "v1",
                    "kind": "Status",
                    "metadata": {},
                    "status": "Failure",
                    "code": exc.status,
                    "reason": exc.reason,
                    "message": exc.message,
                    "details": exc.details or {},
                },
                status=exc.status,
            )
        return await super()._render_error(exc)

    # ---- request dispatch ---------------------------------------------------------------

    def _authenticate(self, request: rendering.Request) -> User:
        """STRICT: a bearer token names the user, an unknown token is a 401; no token is
        system:anonymous (the API server's default --anonymous-auth), whom RBAC then
        allows nothing unless a binding says so."""
        header = request.headers.get("Authorization") or ""
        if not header:
            return ANONYMOUS
        token = header.removeprefix("Bearer ").strip()
        user = self.tokens.get(token)
        if user is None:
            raise _error(401, "Unauthorized", "Unauthorized")
        return user

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        user = self._authenticate(request)
        _USER.set(user)
        res = request.resource
        if res is None or res.plural is None:
            # Discovery and /version: every authenticated user (system:discovery).
            return await super()._handle(request)
        key = (res.group or "", res.plural)
        if key not in self._namespaced:
            raise _error(404, "NotFound", f"the server could not find the requested resource {key}")
        method = request.method.value.upper() if request.method else ""
        sub = request.subresource
        self._authorize(request, user, key, method)
        if sub not in (None, "status"):
            raise _error(404, "NotFound", f"subresource {sub} is not emulated")
        if _is_watch(request):
            return await rendering.Response(payload=self._watch(request, key))(request)
        if request.name is None:
            if method == "GET":
                payload, status = await self._list(request, key), 200
            elif method == "POST":
                payload, status = await self._create(request, key), 201
            else:
                raise _error(405, "MethodNotAllowed", f"{method} on a collection")
        elif method == "GET":
            payload, status = await self._get(request, key), 200
        elif method in ("PATCH", "PUT"):
            payload, status = await self._update(request, key, replace=method == "PUT"), 200
        elif method == "DELETE":
            payload, status = await self._delete(request, key), 200
        else:
            raise _error(405, "MethodNotAllowed", method)
        return aiohttp.web.json_response(payload, status=status)

    def _authorize(
        self, request: rendering.Request, user: User, key: tuple[str, str], method: str
    ) -> None:
        """STRICT: RBAC over the stored roles, as the API server's authorizer sees the
        request (a list or watch narrowed to one name by a field selector is authorized as
        that name, so resourceNames apply)."""
        name = request.name
        if _is_watch(request) or (method == "GET" and name is None):
            verb = "watch" if _is_watch(request) else "list"
            name = _field_selector(request).get("metadata.name")
        elif method == "GET":
            verb = "get"
        elif method == "DELETE":
            verb = "delete" if name else "deletecollection"
        else:
            verb = {"POST": "create", "PATCH": "patch", "PUT": "update"}.get(method, method)
        resource = key[1] + (f"/{request.subresource}" if request.subresource else "")
        ns = self._ns(request, key)
        attrs = Attributes(verb, key[0], resource, ns, name)
        if not self.authorizer.check(user, attrs):
            where = f' in the namespace "{ns}"' if ns else " at the cluster scope"
            what = f'{key[1]} "{name}"' if name else key[1]
            raise _error(
                403,
                "Forbidden",
                f'{what} is forbidden: User "{user.name}" cannot {verb} resource '
                f'"{resource}" in API group "{key[0]}"{where}',
            )

    def _admit(
        self,
        key: tuple[str, str],
        ns: str | None,
        new: dict[str, Any],
        old: dict[str, Any] | None,
    ) -> None:
        """STRICT: what the API server checks on every write before storing it."""
        user = _USER.get()
        name = new["metadata"]["name"]
        pattern = _DNS1035 if key == ("", "services") else _DNS1123_SUBDOMAIN
        if old is None and (not pattern.match(name) or len(name) > 253):
            kind = "DNS-1035 label" if key == ("", "services") else "DNS-1123 subdomain"
            raise _error(422, "Invalid", f'{key[1]} "{name}" is invalid: metadata.name: a {kind}')
        if old is None and key == ("", "services") and len(name) > 63:
            raise _error(
                422, "Invalid", f'services "{name}" is invalid: must be no more than 63 characters'
            )
        schema = self._schemas.get(key)
        if schema is not None:
            errors = crd_validation.validate(schema, new)
            if errors:
                _, kind = self._kinds[key]
                raise _error(
                    422,
                    "Invalid",
                    f'{kind}.{key[0]} "{name}" is invalid: ' + "; ".join(errors),
                )
        # Owner-reference permission enforcement: setting blockOwnerDeletion on a
        # reference needs update on the owner's finalizers.
        before = {
            r.get("uid")
            for r in ((old or {}).get("metadata") or {}).get("ownerReferences") or []
            if r.get("blockOwnerDeletion")
        }
        for ref in new["metadata"].get("ownerReferences") or []:
            if not ref.get("blockOwnerDeletion") or ref.get("uid") in before:
                continue
            plural = self._plurals.get((ref.get("apiVersion", ""), ref.get("kind", "")))
            group = ref.get("apiVersion", "").rpartition("/")[0]
            attrs = Attributes("update", group, f"{plural}/finalizers", ns, ref.get("name"))
            if plural is None or not self.authorizer.check(user, attrs):
                raise _error(
                    403,
                    "Forbidden",
                    f'{key[1]} "{name}" is forbidden: cannot set blockOwnerDeletion if an '
                    "ownerReference refers to a resource you can't set finalizers on: "
                    f'User "{user.name}" cannot update resource "{plural}/finalizers" '
                    f'in API group "{group}"',
                )
        # RBAC escalation prevention: grant only what you hold.
        escalate = Attributes("escalate", RBAC, key[1], ns, name)
        if (
            key[0] == RBAC
            and key[1] in ("roles", "clusterroles")
            and not self.authorizer.allowed(user, escalate)
        ):
            missing = self.authorizer.covers(user, ns, new.get("rules") or [])
            if missing:
                raise _error(
                    403,
                    "Forbidden",
                    f'{key[1]} "{name}" is forbidden: user "{user.name}" is attempting '
                    f"to grant RBAC permissions not currently held: {sorted(set(missing))}",
                )
        if key[0] == RBAC and key[1] in ("rolebindings", "clusterrolebindings"):
            ref = new.get("roleRef") or {}
            role_key = (RBAC, "clusterroles" if ref.get("kind") == "ClusterRole" else "roles")
            role_ns = None if ref.get("kind") == "ClusterRole" else ns
            role = self._store[role_key].get((role_ns, ref.get("name", "")))
            bind = Attributes("bind", RBAC, role_key[1], ns, ref.get("name"))
            if role is not None and not self.authorizer.allowed(user, bind):
                missing = self.authorizer.covers(user, ns, role.get("rules") or [])
                if missing:
                    raise _error(
                        403,
                        "Forbidden",
                        f'{key[1]} "{name}" is forbidden: user "{user.name}" is attempting '
                        f"to grant RBAC permissions not currently held: {sorted(set(missing))}",
                    )

    def _namespace_open(self, ns: str | None) -> None:
        """STRICT (NamespaceLifecycle): no new objects in a missing or terminating one."""
        if ns is None:
            return
        namespace = self._store[("", "namespaces")].get((None, ns))
        if namespace is None:
            raise _error(404, "NotFound", f'namespaces "{ns}" not found')
        if namespace["metadata"].get("deletionTimestamp"):
            raise _error(
                403,
                "Forbidden",
                f"unable to create new content in namespace {ns} because it is being terminated",
            )

    # ---- helpers ------------------------------------------------------------------------

    def _ns(self, request: rendering.Request, key: tuple[str, str]) -> str | None:
        return request.namespace if self._namespaced[key] else None

    def _decorate(self, key: tuple[str, str], obj: dict[str, Any]) -> dict[str, Any]:
        group_version, kind = self._kinds[key]
        obj.setdefault("apiVersion", group_version)
        obj.setdefault("kind", kind)
        return obj

    async def _emit(self, key: tuple[str, str], kind: str, obj: dict[str, Any]) -> None:
        rv = int(obj["metadata"]["resourceVersion"])
        event = {"type": kind, "object": copy.deepcopy(obj)}
        self._events[key].append((rv, event))
        for queue in self._watchers[key]:
            queue.put_nowait(event)

    def _bump(self, obj: dict[str, Any]) -> None:
        self._last_rv = next(self._revision)
        obj["metadata"]["resourceVersion"] = str(self._last_rv)

    # ---- verbs --------------------------------------------------------------------------

    async def _get(self, request: rendering.Request, key: tuple[str, str]) -> dict[str, Any]:
        obj = self._store[key].get((self._ns(request, key), request.name or ""))
        if obj is None:
            raise _error(404, "NotFound", f'{key[1]} "{request.name}" not found')
        return obj

    async def _list(self, request: rendering.Request, key: tuple[str, str]) -> dict[str, Any]:
        ns = self._ns(request, key)
        labels = _label_selector(request)
        async with self._mutex:
            selector = _field_selector(request)
            items = [
                o
                for (n, _), o in self._store[key].items()
                if (ns is None or n == ns) and _selected(o, selector) and _labelled(o, labels)
            ]
            group_version, kind = self._kinds[key]
            # GAP: lists carried resourceVersion "..." (kopf then watches from nowhere).
            return {
                "apiVersion": group_version,
                "kind": f"{kind}List",
                "metadata": {"resourceVersion": str(self._last_rv)},
                "items": copy.deepcopy(items),
            }

    async def _create(self, request: rendering.Request, key: tuple[str, str]) -> dict[str, Any]:
        obj = copy.deepcopy(request.data or {})
        meta = obj.setdefault("metadata", {})
        # GAP: generateName was ignored (kopf's Event posts then collided with 409).
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        if not meta.get("name"):
            raise _error(422, "Invalid", "metadata.name: Required value")
        # GAP: metadata.namespace was not filled from the URL.
        ns = self._ns(request, key)
        if ns is not None:
            if meta.get("namespace") not in (None, ns):
                raise _error(400, "BadRequest", "the namespace of the object does not match")
            meta["namespace"] = ns
        if key in self._status_subresource:
            obj.pop("status", None)  # the status subresource ignores status on create
        async with self._mutex:
            self._namespace_open(ns)
            if (ns, meta["name"]) in self._store[key]:
                raise _error(409, "AlreadyExists", f'{key[1]} "{meta["name"]}" already exists')
            self._admit(key, ns, obj, None)
            # GAP: no uid, resourceVersion, generation or creationTimestamp were set.
            meta["uid"] = str(uuid.uuid4())
            meta["generation"] = 1
            meta["creationTimestamp"] = _now()
            meta.pop("deletionTimestamp", None)
            self._decorate(key, obj)
            self._bump(obj)
            self._store[key][(ns, meta["name"])] = obj
            await self._emit(key, "ADDED", obj)
            return copy.deepcopy(obj)

    async def _update(
        self, request: rendering.Request, key: tuple[str, str], *, replace: bool
    ) -> dict[str, Any]:
        ns = self._ns(request, key)
        body = request.data
        async with self._mutex:
            old = self._store[key].get((ns, request.name or ""))
            if old is None:
                # GAP: PUT (replace) answered 404 for existing objects; PATCH 404s were fine.
                raise _error(404, "NotFound", f'{key[1]} "{request.name}" not found')
            if replace:
                new = copy.deepcopy(body)
            elif isinstance(body, list):
                try:
                    new = jsonpatch.apply_patch(copy.deepcopy(old), body)
                except jsonpatch.JsonPatchTestFailed as exc:
                    # GAP: a failed JSON-patch `test` was answered 500, not 422.
                    raise _error(422, "Invalid", f"the test operation failed: {exc}") from None
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                    raise _error(422, "Invalid", str(exc)) from None
            elif isinstance(body, dict):
                wanted_rv = (body.get("metadata") or {}).get("resourceVersion")
                if wanted_rv is not None and wanted_rv != old["metadata"]["resourceVersion"]:
                    raise _error(409, "Conflict", "the object has been modified")
                new = _merge_patch(copy.deepcopy(old), body)
            else:
                raise _error(400, "BadRequest", "a patch must be a JSON object or array")
            new.setdefault("metadata", {})
            if replace:
                wanted_rv = new["metadata"].get("resourceVersion")
                if wanted_rv not in (None, old["metadata"]["resourceVersion"]):
                    raise _error(409, "Conflict", "the object has been modified")
            # Identity and system fields are the server's.
            for field in ("uid", "creationTimestamp", "generation", "namespace", "name"):
                if field in old["metadata"]:
                    new["metadata"][field] = old["metadata"][field]
            if "deletionTimestamp" in old["metadata"]:
                new["metadata"]["deletionTimestamp"] = old["metadata"]["deletionTimestamp"]
            new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
            # GAP: with a status subresource, the main endpoint ignores status and /status
            # ignores everything but status (kmock merged both everywhere).
            if key in self._status_subresource:
                if request.subresource == "status":
                    status = new.get("status")
                    new = {**copy.deepcopy(old), "status": status}
                    if status is None:
                        new.pop("status")
                else:
                    new.pop("status", None)
                    if "status" in old:
                        new["status"] = copy.deepcopy(old["status"])
            self._decorate(key, new)
            if new == old:
                return copy.deepcopy(old)  # a no-op write changes nothing, emits nothing
            self._admit(key, ns, new, old)
            # GAP: generation never moved. It moves when anything but metadata/status changes.
            if _essence(new) != _essence(old):
                new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
            self._bump(new)
            meta = new["metadata"]
            self._store[key][(ns, meta["name"])] = new
            if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                await self._remove(key, ns, meta["name"])
            else:
                await self._emit(key, "MODIFIED", new)
            await self._sweep()
            return copy.deepcopy(new)

    async def _delete(self, request: rendering.Request, key: tuple[str, str]) -> dict[str, Any]:
        ns = self._ns(request, key)
        options = request.data if isinstance(request.data, dict) else {}
        policy = options.get("propagationPolicy") or request.params.get("propagationPolicy")
        async with self._mutex:
            obj = self._store[key].get((ns, request.name or ""))
            if obj is None:
                raise _error(404, "NotFound", f'{key[1]} "{request.name}" not found')
            await self._delete_locked(key, ns, obj["metadata"]["name"], policy or "Background")
            await self._sweep()
            current = self._store[key].get((ns, obj["metadata"]["name"]))
            return copy.deepcopy(current if current is not None else obj)

    # ---- deletion, garbage collection, namespaces (STRICT) ------------------------------

    async def _mark_deleting(
        self, key: tuple[str, str], obj: dict[str, Any], *finalizers: str
    ) -> None:
        meta = obj["metadata"]
        changed = False
        if not meta.get("deletionTimestamp"):
            meta["deletionTimestamp"] = _now()
            changed = True
        for finalizer in finalizers:
            if finalizer not in (meta.get("finalizers") or []):
                meta.setdefault("finalizers", []).append(finalizer)
                changed = True
        if changed:
            self._bump(obj)
            await self._emit(key, "MODIFIED", obj)

    async def _delete_locked(
        self, key: tuple[str, str], ns: str | None, name: str, policy: str
    ) -> None:
        obj = self._store[key].get((ns, name))
        if obj is None:
            return
        obj = copy.deepcopy(obj)
        self._store[key][(ns, name)] = obj
        if key == ("", "namespaces"):
            # The namespace controller: Terminating until every object in it is gone.
            obj.setdefault("spec", {})["finalizers"] = ["kubernetes"]
            obj.setdefault("status", {})["phase"] = "Terminating"
            await self._mark_deleting(key, obj)
            for other, objects in list(self._store.items()):
                if not self._namespaced.get(other):
                    continue
                for other_ns, other_name in list(objects):
                    if other_ns == name:
                        await self._delete_locked(other, other_ns, other_name, "Background")
            return
        if policy == "Orphan":
            uid = obj["metadata"]["uid"]
            for dep_key, dep_ns, dep in self._dependents(uid):
                refs = [r for r in dep["metadata"]["ownerReferences"] if r.get("uid") != uid]
                dep = copy.deepcopy(dep)
                dep["metadata"]["ownerReferences"] = refs
                self._bump(dep)
                self._store[dep_key][(dep_ns, dep["metadata"]["name"])] = dep
                await self._emit(dep_key, "MODIFIED", dep)
        if policy == "Foreground":
            await self._mark_deleting(key, obj, "foregroundDeletion")
            for dep_key, dep_ns, dep in self._dependents(obj["metadata"]["uid"]):
                await self._delete_locked(dep_key, dep_ns, dep["metadata"]["name"], "Foreground")
            return
        if obj["metadata"].get("finalizers"):
            await self._mark_deleting(key, obj)
            return
        await self._remove(key, ns, name)

    def _dependents(self, uid: str) -> list[tuple[tuple[str, str], str | None, dict[str, Any]]]:
        return [
            (key, ns, obj)
            for key, objects in self._store.items()
            for (ns, _), obj in list(objects.items())
            if any(r.get("uid") == uid for r in obj["metadata"].get("ownerReferences") or [])
        ]

    def _exists(self, uid: str) -> bool:
        return any(
            o["metadata"].get("uid") == uid and not o["metadata"].get("deletionTimestamp")
            for objects in self._store.values()
            for o in objects.values()
        )

    async def _remove(self, key: tuple[str, str], ns: str | None, name: str) -> None:
        """Gone for good; then the garbage collector deletes dependents whose owners are
        all gone (background), and drops references to this owner from the others."""
        obj = self._store[key].pop((ns, name), None)
        if obj is None:
            return
        obj = copy.deepcopy(obj)
        self._bump(obj)
        await self._emit(key, "DELETED", obj)
        uid = obj["metadata"]["uid"]
        for dep_key, dep_ns, dep in self._dependents(uid):
            others = [r for r in dep["metadata"]["ownerReferences"] if r.get("uid") != uid]
            if any(self._exists(r.get("uid", "")) for r in others):
                dep = copy.deepcopy(dep)
                dep["metadata"]["ownerReferences"] = others
                self._bump(dep)
                self._store[dep_key][(dep_ns, dep["metadata"]["name"])] = dep
                await self._emit(dep_key, "MODIFIED", dep)
            else:
                await self._delete_locked(dep_key, dep_ns, dep["metadata"]["name"], "Background")

    async def _sweep(self) -> None:
        """Finish what waits on others: foreground owners whose blocking dependents are
        gone, and terminating namespaces that are empty."""
        progress = True
        while progress:
            progress = False
            for key, objects in list(self._store.items()):
                for (ns, name), obj in list(objects.items()):
                    meta = obj["metadata"]
                    if not meta.get("deletionTimestamp"):
                        continue
                    if "foregroundDeletion" in (meta.get("finalizers") or []):
                        blocking = [
                            d
                            for _, _, d in self._dependents(meta["uid"])
                            if any(
                                r.get("uid") == meta["uid"] and r.get("blockOwnerDeletion")
                                for r in d["metadata"]["ownerReferences"]
                            )
                        ]
                        if not blocking:
                            meta["finalizers"].remove("foregroundDeletion")
                            self._bump(obj)
                            if meta["finalizers"]:
                                await self._emit(key, "MODIFIED", obj)
                            else:
                                await self._remove(key, ns, name)
                            progress = True
                    elif key == ("", "namespaces") and not self._namespace_has_objects(name):
                        await self._remove(key, ns, name)
                        progress = True

    def _namespace_has_objects(self, namespace: str) -> bool:
        return any(
            ns == namespace
            for key, objects in self._store.items()
            if self._namespaced.get(key)
            for (ns, _) in objects
        )

    async def _watch(
        self, request: rendering.Request, key: tuple[str, str]
    ) -> AsyncIterator[dict[str, Any] | bytes]:
        ns = self._ns(request, key)
        selector = _field_selector(request)
        labels = _label_selector(request)
        since = request.params.get("resourceVersion")
        timeout = float(request.params.get("timeoutSeconds") or 0) or None
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        # GAP: kmock subscribed only after sending its snapshot (events in between were
        # lost). Subscribe and take the snapshot under one lock.
        async with self._mutex:
            self._watchers[key].add(queue)
            if since and since != "0":
                backlog = [e for rv, e in self._events[key] if rv > int(since)]
            else:
                backlog = [
                    {"type": "ADDED", "object": copy.deepcopy(o)}
                    for (n, _), o in self._store[key].items()
                    if ns is None or n == ns
                ]
        try:
            yield b""  # send the headers now
            for event in backlog:
                obj = event["object"]
                if _watched(obj, ns, selector, labels):
                    yield event
            loop = asyncio.get_running_loop()
            deadline = None if timeout is None else loop.time() + timeout
            while True:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return
                try:
                    event = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    return
                obj = event["object"]
                if _watched(obj, ns, selector, labels):
                    yield event
        finally:
            self._watchers[key].discard(queue)

    # ---- direct access for assertions (thread-safe through the running loop) ------------

    def snapshot(self, group: str, plural: str) -> dict[tuple[str | None, str], dict[str, Any]]:
        return copy.deepcopy(dict(self._store[(group, plural)]))


def _is_watch(request: rendering.Request) -> bool:
    """?watch=true, ?watch=1 (the API server parses either as a bool), or kmock's own."""
    return request.action == enums.action.WATCH or (
        request.name is None and request.params.get("watch") in ("1", "true", "True")
    )


def _field_selector(request: rendering.Request) -> dict[str, str]:
    """`metadata.name=x,metadata.namespace=y` (the only field selectors the clients use)."""
    raw = request.params.get("fieldSelector") or ""
    pairs = [part.split("=", 1) for part in raw.split(",") if "=" in part]
    return {k.strip(): v.strip().lstrip("=") for k, v in pairs}


# One requirement of a label selector: (key, operator, value); operators "=", "!=",
# "exists", "!exists".
_Requirement = tuple[str, str, str]


def _label_selector(request: rendering.Request) -> list[_Requirement]:
    """GAP: `labelSelector` was ignored (every object listed). Equality (`a=b`, `a==b`,
    `a!=b`) and existence (`a`, `!a`) requirements, ANDed; set-based ones are refused
    rather than answered wrongly. (A watch does not turn an object that stops matching into
    a DELETED event as the API server does: no client here watches by label.)"""
    raw = request.params.get("labelSelector") or ""
    found: list[_Requirement] = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        if " in " in part or " notin " in part or "(" in part:
            raise _error(400, "BadRequest", f"set-based label selector not emulated: {part}")
        if "!=" in part:
            k, v = part.split("!=", 1)
            found.append((k.strip(), "!=", v.strip()))
        elif "=" in part:
            k, v = part.replace("==", "=").split("=", 1)
            found.append((k.strip(), "=", v.strip()))
        elif part.startswith("!"):
            found.append((part[1:].strip(), "!exists", ""))
        else:
            found.append((part, "exists", ""))
    return found


def _labelled(obj: dict[str, Any], requirements: list[_Requirement]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for key, op, value in requirements:
        if op == "=" and labels.get(key) != value:
            return False
        if op == "!=" and labels.get(key) == value:
            return False
        if op == "exists" and key not in labels:
            return False
        if op == "!exists" and key in labels:
            return False
    return True


def _watched(
    obj: dict[str, Any], ns: str | None, selector: dict[str, str], labels: list[_Requirement]
) -> bool:
    in_namespace = ns is None or obj["metadata"].get("namespace") == ns
    return in_namespace and _selected(obj, selector) and _labelled(obj, labels)


def _selected(obj: dict[str, Any], selector: dict[str, str]) -> bool:
    meta = obj.get("metadata") or {}
    return all(
        meta.get(field.removeprefix("metadata.")) == value for field, value in selector.items()
    )


def _essence(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (kmock's own merge raised on dict<->scalar swaps)."""
    if not isinstance(patch, dict):
        return patch
    if not isinstance(target, dict):
        target = {}
    for name, value in patch.items():
        if value is None:
            target.pop(name, None)
        else:
            target[name] = _merge_patch(target.get(name), value)
    return target


class EmulatorThread:
    """Runs an Emulator on 127.0.0.1 in a background thread; `url` is its address."""

    def __init__(self, *, service_monitor: bool = False, inference_pool: bool = False) -> None:
        """`service_monitor`, `inference_pool`: serve those third-party kinds, as if the
        Prometheus operator or the Gateway API Inference Extension were installed."""
        self.emulator = Emulator()
        self.emulator.register_builtins(service_monitor=service_monitor)
        self.crds = self.emulator.register_crds()
        if inference_pool:
            self.emulator.register_crd(INFERENCE_POOL_CRD)
        self._loop: asyncio.AbstractEventLoop  # the thread's, set before it is ready
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.url = ""
        self._thread = threading.Thread(target=self._run, name="k8s-emulator", daemon=True)

    def __enter__(self) -> EmulatorThread:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the emulator did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        # asyncio.Runner ends as asyncio.run does: watches still streaming when the server
        # stops are cancelled on this loop, not finalised later by the collector on a
        # closed one (an unraisable `Queue.get` warning in whichever test ran then).
        with asyncio.Runner() as runner:
            self._loop = runner.get_loop()
            runner.run(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with self.emulator, kmock.Server(self.emulator) as server:
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def call(self, fn: Any, *args: Any) -> Any:
        """Run a coroutine function on the emulator's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(fn(*args), self._loop).result(10)

    def objects(self, group: str, plural: str) -> dict[tuple[str | None, str], dict[str, Any]]:
        async def read() -> dict[tuple[str | None, str], dict[str, Any]]:
            return self.emulator.snapshot(group, plural)

        return self.call(read)

    def requests(self) -> list[rendering.Request]:
        async def read() -> list[rendering.Request]:
            return list(self.emulator._requests)

        return self.call(read)

    def token_for(self, user: User) -> str:
        """A bearer token that authenticates as `user` (e.g. k8s_rbac.service_account)."""
        token = f"token-{secrets.token_hex(8)}"

        async def add() -> None:
            self.emulator.tokens[token] = user

        self.call(add)
        return token

    def service_account_token(self, namespace: str, name: str) -> str:
        return self.token_for(service_account(namespace, name))

    def create_namespaces(self, *names: str) -> None:
        """Namespaces exist before anything is created in them (NamespaceLifecycle)."""

        async def add() -> None:
            for name in names:
                if (None, name) in self.emulator._store[("", "namespaces")]:
                    continue
                obj = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
                obj["metadata"].update(
                    uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1
                )
                obj["status"] = {"phase": "Active"}
                self.emulator._bump(obj)
                self.emulator._store[("", "namespaces")][(None, name)] = obj
                await self.emulator._emit(("", "namespaces"), "ADDED", obj)

        self.call(add)

    def bind_anonymous_as_admin(self) -> None:
        """kubectl sends no bearer token over plain HTTP (client-go keeps credentials for
        TLS), so tests that drive the real kubectl bind system:anonymous to a cluster-admin
        role, as a kind kubeconfig's admin user would be. Everyone else still has a token."""

        async def add() -> None:
            rbac = "rbac.authorization.k8s.io"
            role = {
                "apiVersion": f"{rbac}/v1",
                "kind": "ClusterRole",
                "metadata": {"name": "emulator-cluster-admin"},
                "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}],
            }
            binding = {
                "apiVersion": f"{rbac}/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": "emulator-anonymous-admin"},
                "roleRef": {
                    "apiGroup": rbac,
                    "kind": "ClusterRole",
                    "name": role["metadata"]["name"],
                },
                "subjects": [{"kind": "User", "name": ANONYMOUS.name}],
            }
            for plural, obj in (("clusterroles", role), ("clusterrolebindings", binding)):
                obj["metadata"].update(
                    uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1
                )
                self.emulator._bump(obj)
                self.emulator._store[(rbac, plural)][(None, obj["metadata"]["name"])] = obj

        self.call(add)

    def denials(self) -> list[tuple[User, Attributes]]:
        """Every request RBAC refused so far (for assertions and failure messages)."""

        async def read() -> list[tuple[User, Attributes]]:
            return list(self.emulator.authorizer.denials)

        return self.call(read)

    def write_kubeconfig(
        self, path: Path, token: str = ADMIN_TOKEN, *, server: str | None = None
    ) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": server or self.url}}],
            "users": [{"name": "tests", "user": {"token": token}}],
            "contexts": [
                {
                    "name": "emulator",
                    "context": {"cluster": "emulator", "user": "tests", "namespace": "default"},
                }
            ],
            "current-context": "emulator",
        }
        path.write_text(json.dumps(config))
        return path
