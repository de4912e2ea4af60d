"""Make one child object look like its manifest, writing only when it does not.

Level-based and idempotent: read the child, compare the fields we manage (a subset
comparison, because the API server adds defaults we do not set), and patch only when
something we manage differs. So a reconcile against an unchanged cluster makes no writes.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from .client import ApiError, Kind, KubeClient

# Maps the operator owns entirely in a child, per resource: keys it stops wanting go away.
_NODE_SELECTOR = ("spec", "template", "spec", "nodeSelector")
OWNED_MAPS: dict[str, tuple[tuple[str, ...], ...]] = {
    "deployments": (_NODE_SELECTOR,),
    "daemonsets": (_NODE_SELECTOR,),
    "secrets": (("data",),),
}


class NotOurs(Exception):
    """The object exists but another owner controls it: never overwritten."""


def contains(actual: Any, desired: Any) -> bool:
    """Whether `actual` already has everything `desired` says (dicts by key, lists by
    position and length, scalars by equality; ints and their string forms are equal)."""
    if isinstance(desired, dict):
        if not isinstance(actual, dict):
            return False
        return all(contains(actual.get(k), v) for k, v in desired.items())
    if isinstance(desired, list):
        if not isinstance(actual, list) or len(actual) != len(desired):
            return False
        return all(contains(a, d) for a, d in zip(actual, desired, strict=True))
    if actual == desired:
        return True
    return isinstance(desired, int | str) and str(actual) == str(desired)


def plain(value: Any) -> Any:
    """A deep copy as plain dicts and lists (kopf hands out read-only mapping views)."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def owned_by(obj: dict[str, Any], uid: str) -> bool:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid for ref in refs)


def _managed(manifest: dict[str, Any]) -> dict[str, Any]:
    """What we compare and patch: everything but identity (name/namespace)."""
    meta = {k: v for k, v in manifest["metadata"].items() if k not in ("name", "namespace")}
    body = {k: v for k, v in manifest.items() if k not in ("apiVersion", "kind", "metadata")}
    return {"metadata": meta, **body}


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def _drop_extra_keys(
    patch: dict[str, Any], current: dict[str, Any], owned_maps: tuple[tuple[str, ...], ...]
) -> None:
    """A merge patch adds map keys but never removes them: for maps we own entirely (a node
    selector, a Secret's data), null out the keys we no longer want."""
    for path in owned_maps:
        have, want = _get(current, path), _get(patch, path)
        if not isinstance(have, dict):
            continue
        extra = {k: None for k in have if not isinstance(want, dict) or k not in want}
        if not extra:
            continue
        node = patch
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = {**(want or {}), **extra}


async def ensure(
    client: KubeClient,
    kind: Kind,
    manifest: dict[str, Any],
    owner_uid: str,
) -> str:
    """Create or converge one child. Returns "created", "patched" or "unchanged"."""
    ns = manifest["metadata"].get("namespace")
    name = manifest["metadata"]["name"]
    current = await client.get(kind, ns, name)
    if current is None:
        try:
            await client.create(kind, ns, manifest)
            return "created"
        except ApiError as exc:
            if exc.status != 409:
                raise
            current = await client.get(kind, ns, name)
            if current is None:
                raise
    if not owned_by(current, owner_uid):
        raise NotOurs(f"{kind.plural}/{name} exists and is not owned by this object")
    desired = _managed(manifest)
    patch = copy.deepcopy(desired)
    _drop_extra_keys(patch, current, OWNED_MAPS.get(kind.plural, ()))
    if contains(current, desired) and patch == desired:
        return "unchanged"
    await client.patch(kind, ns, name, patch)
    return "patched"


async def remove(client: KubeClient, kind: Kind, ns: str, name: str, owner_uid: str) -> bool:
    """Delete a child we own (e.g. a PodDisruptionBudget that was switched off)."""
    current = await client.get(kind, ns, name)
    if current is None or not owned_by(current, owner_uid):
        return False
    await client.delete(kind, ns, name)
    return True
