"""The operator's in-memory state, shared by the handlers through kopf's memo.

It holds what is not in any single object: the API client, the hashes read from key
Secrets (by ApiKey uid), today's usage per gateway, one ConfigWriter and one Converger per
parent, and one lock per object whose status is written. All of it can be rebuilt from
the cluster, which is what happens after a restart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import kopf

from .client import SECRETS, Kind, KubeClient
from .configdoc import ApiKeyView, GatewayView
from .keys import OPT_IN_LABEL, Material, MaterialError, material_from_secret, opted_in
from .usage import DayUsage, UsageReader

if TYPE_CHECKING:
    from .converge import Converger
    from .writer import ConfigWriter

KeyStatusHook = Callable[[str, Iterable[str]], Awaitable[None]]
# A gateway's status should be recomputed (namespace, name): its InferencePool resolved anew.
GatewayStatusHook = Callable[[str, str], Awaitable[None]]


class ObjectKey(NamedTuple):
    """One object of one kind: what locks and per-object state are keyed by."""

    kind: Kind
    namespace: str
    name: str


class GatewayKey(NamedTuple):
    namespace: str
    name: str


@dataclass
class Runtime:
    client: KubeClient
    usage_reader: UsageReader = field(default_factory=UsageReader)
    # ApiKey uid -> the hashes of its key (or why there are none).
    materials: dict[str, Material | MaterialError] = field(default_factory=dict)
    # Today's usage of each gateway's keys.
    usage: dict[GatewayKey, DayUsage] = field(default_factory=dict)
    writers: dict[GatewayKey, ConfigWriter] = field(default_factory=dict)
    # Parent uid -> the loop that converges its children.
    convergers: dict[str, Converger] = field(default_factory=dict)
    locks: dict[ObjectKey, asyncio.Lock] = field(default_factory=dict)
    key_status_hook: KeyStatusHook | None = None
    gateway_status_hook: GatewayStatusHook | None = None
    # kopf's live index of InferenceGateways (set by the first handler that receives it).
    gateway_index: kopf.Index[GatewayKey, GatewayView] | None = None
    # The status of the operator's Deployments and DaemonSets as the child watches deliver
    # it, by (plural, namespace, name); None: seen deleted. Not there: not seen yet.
    workloads: dict[tuple[str, str, str], dict[str, Any] | None] = field(default_factory=dict)
    # Data keys (with a value) of every Secret the Secret watch delivered; None: deleted.
    secret_keys: dict[tuple[str, str], frozenset[str] | None] = field(default_factory=dict)

    def observe_workload(self, plural: str, obj: dict[str, Any] | None, ns: str, name: str) -> None:
        self.workloads[(plural, ns, name)] = None if obj is None else (obj.get("status") or {})

    async def workload_status(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        """A child workload's status: from the watch when it has delivered the object,
        else one GET (the first refresh after a start, before the listing arrived)."""
        key = (kind.plural, namespace, name)
        if key in self.workloads:
            return self.workloads[key]
        obj = await self.client.get(kind, namespace, name)
        return None if obj is None else (obj.get("status") or {})

    def lock(self, kind: Kind, namespace: str, name: str) -> asyncio.Lock:
        return self.locks.setdefault(ObjectKey(kind, namespace, name), asyncio.Lock())

    def gateway_alive(self, namespace: str, name: str) -> bool:
        if self.gateway_index is None:
            return False
        views: Iterable[GatewayView] = self.gateway_index.get(GatewayKey(namespace, name), [])
        return any(not v.deleting for v in views)

    def poke_namespace(self, namespace: str) -> None:
        """Something a gateway config may depend on changed in this namespace."""
        for key, writer in list(self.writers.items()):
            if key.namespace == namespace:
                writer.poke()

    def poke_pool(self, namespace: str, pool: str) -> None:
        """An InferencePool changed: the gateways that name it resolve it again."""
        for key, writer in list(self.writers.items()):
            if key.namespace == namespace and writer.pool() == pool:
                writer.poke()

    def poke_pod(self, namespace: str, pod: str, labels: Mapping[str, str]) -> None:
        """A pod changed: the gateways whose pool it was or is in resolve again (other
        pods, e.g. the gateways' own, poke nobody)."""
        for key, writer in list(self.writers.items()):
            resolution = writer.resolution
            if key.namespace != namespace or resolution is None:
                continue
            if resolution.concerns(pod, labels):
                writer.poke()

    def poke_owners(self, owner_uids: Iterable[str]) -> None:
        """A child changed: its parents converge again."""
        for uid in owner_uids:
            converger = self.convergers.get(uid)
            if converger is not None:
                converger.poke()

    async def load_material(self, key: ApiKeyView) -> Material | MaterialError | None:
        """The key's hashes from its Secret (reads only; the ApiKey handler creates
        generated Secrets). Cached by uid; None when the Secret is not there."""
        secret = await self.client.get(SECRETS, key.namespace, key.secret_name)
        return self.remember(key, secret)

    def remember(
        self, key: ApiKeyView, secret: dict[str, Any] | None
    ) -> Material | MaterialError | None:
        result: Material | MaterialError
        if not key.generated and (secret is None or not opted_in(secret)):
            # Missing and not opted in read the same: no oracle over the namespace's Secrets.
            result = MaterialError(
                "SecretUnavailable",
                f"Secret {key.secret_name} is missing or not labelled {OPT_IN_LABEL}=true",
            )
        elif secret is None:
            self.materials.pop(key.uid, None)
            return None
        elif key.generated and not _owned(secret, key.uid):
            result = MaterialError(
                "SecretConflict", f"Secret {key.secret_name} exists and is not this key's"
            )
        else:
            try:
                result = material_from_secret(secret, key.key_field, key.previous_field)
            except MaterialError as exc:
                result = exc
        self.materials[key.uid] = result
        return result

    async def close(self) -> None:
        await self.usage_reader.close()
        await self.client.close()


def _owned(obj: dict[str, Any], uid: str) -> bool:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid for ref in refs)
