"""The Kubernetes API emulator the operator tests run against: kmock 0.8, fixed up.

kmock (by kopf's author) serves the Kubernetes REST API from memory. As shipped (0.8) it
cannot carry a kopf operator past its first finalizer; every gap closed here is marked
`GAP:` with what the real API server does instead. Everything lives in this one module, and
it touches kmock internals, so kmock is pinned (==0.8).

What stays unemulated (the `cluster` tests cover it): garbage collection, controllers (no
pods, no readyReplicas unless a test writes them), schema validation and defaulting (the
tests validate with jsonschema), RBAC, strategic-merge-patch list merging, field/label
selectors.

The emulator runs in a thread with its own event loop, so tests stay synchronous and the
operator under test is a real process talking HTTP to it.
"""

from __future__ import annotations

import asyncio
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
import jsonpatch
import kmock
import yaml
from kmock._internal import enums, parsing, rendering

CRD_DIR = Path(__file__).resolve().parents[2] / "charts" / "tollgate" / "crds"
TEST_USER_AGENT = "tollgate-tests"

# Built-in kinds the operator (and kopf) may touch: (group/version, plural, kind, namespaced).
BUILTIN = [
    ("v1", "secrets", "Secret", True),
    ("v1", "services", "Service", True),
    ("v1", "serviceaccounts", "ServiceAccount", True),
    ("v1", "events", "Event", True),
    ("v1", "configmaps", "ConfigMap", True),
    ("v1", "namespaces", "Namespace", False),
    ("events.k8s.io/v1", "events", "Event", True),
    ("apps/v1", "deployments", "Deployment", True),
    ("apps/v1", "daemonsets", "DaemonSet", True),
    ("policy/v1", "poddisruptionbudgets", "PodDisruptionBudget", True),
    ("rbac.authorization.k8s.io/v1", "roles", "Role", True),
    ("rbac.authorization.k8s.io/v1", "rolebindings", "RoleBinding", True),
]
SERVICE_MONITOR = ("monitoring.coreos.com/v1", "servicemonitors", "ServiceMonitor", True)
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

    def register_crds(self, crd_dir: Path = CRD_DIR) -> list[dict[str, Any]]:
        """Register every CRD in the chart's crds/ folder, the files as they ship."""
        crds = []
        for path in sorted(crd_dir.glob("*.yaml")):
            crd = yaml.safe_load(path.read_text())
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
            crds.append(crd)
        return crds

    def register_builtins(self, *, service_monitor: bool = False) -> None:
        for entry in [*BUILTIN, *([SERVICE_MONITOR] if service_monitor else [])]:
            self.register(*entry)

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

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        res = request.resource
        if res is None or res.plural is None:
            return await super()._handle(request)  # discovery, /version, non-k8s paths
        key = (res.group or "", res.plural)
        if key not in self._namespaced:
            raise _error(404, "NotFound", f"the server could not find the requested resource {key}")
        method = request.method.value.upper() if request.method else ""
        sub = request.subresource
        if sub not in (None, "status"):
            raise _error(404, "NotFound", f"subresource {sub} is not emulated")
        if request.action == enums.action.WATCH:
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
        async with self._mutex:
            items = [o for (n, _), o in self._store[key].items() if ns is None or n == ns]
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
            if (ns, meta["name"]) in self._store[key]:
                raise _error(409, "AlreadyExists", f'{key[1]} "{meta["name"]}" already exists')
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
            # GAP: generation never moved. It moves when anything but metadata/status changes.
            if _essence(new) != _essence(old):
                new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
            self._bump(new)
            meta = new["metadata"]
            if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                del self._store[key][(ns, meta["name"])]
                await self._emit(key, "DELETED", new)
            else:
                self._store[key][(ns, meta["name"])] = new
                await self._emit(key, "MODIFIED", new)
            return copy.deepcopy(new)

    async def _delete(self, request: rendering.Request, key: tuple[str, str]) -> dict[str, Any]:
        ns = self._ns(request, key)
        async with self._mutex:
            obj = self._store[key].get((ns, request.name or ""))
            if obj is None:
                raise _error(404, "NotFound", f'{key[1]} "{request.name}" not found')
            if obj["metadata"].get("finalizers"):
                if not obj["metadata"].get("deletionTimestamp"):
                    obj = copy.deepcopy(obj)
                    obj["metadata"]["deletionTimestamp"] = _now()
                    self._bump(obj)
                    self._store[key][(ns, obj["metadata"]["name"])] = obj
                    await self._emit(key, "MODIFIED", obj)
                return copy.deepcopy(obj)
            del self._store[key][(ns, obj["metadata"]["name"])]
            obj = copy.deepcopy(obj)
            self._bump(obj)
            await self._emit(key, "DELETED", obj)
            return obj

    async def _watch(
        self, request: rendering.Request, key: tuple[str, str]
    ) -> AsyncIterator[dict[str, Any] | bytes]:
        ns = self._ns(request, key)
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
                if ns is None or event["object"]["metadata"].get("namespace") == ns:
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
                if ns is None or event["object"]["metadata"].get("namespace") == ns:
                    yield event
        finally:
            self._watchers[key].discard(queue)

    # ---- direct access for assertions (thread-safe through the running loop) ------------

    def snapshot(self, group: str, plural: str) -> dict[tuple[str | None, str], dict[str, Any]]:
        return copy.deepcopy(dict(self._store[(group, plural)]))


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

    def __init__(self, *, service_monitor: bool = False) -> None:
        self.emulator = Emulator()
        self.emulator.register_builtins(service_monitor=service_monitor)
        self.crds = self.emulator.register_crds()
        self._loop = asyncio.new_event_loop()
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
        self._loop.run_until_complete(self._serve())

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

    def write_kubeconfig(self, path: Path) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tests", "user": {"token": "emulator-token"}}],
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
