"""QuotaPolicy: limits that reach every gateway whose keys use the policy.

A policy has no children: its limits are copied into the config Secret of each gateway
with a key that uses it (the writers are poked on every change, and the gateway reloads the
document in place, so no pod restarts). No finalizer: deleting a policy that keys still
use takes those keys out of the config (fail-closed, never unlimited), and each such key
says PolicyMissing in its Ready condition; nothing waits on the operator.
"""

from __future__ import annotations

from typing import Any

import kopf

from ..client import QUOTA_POLICIES
from ..conditions import condition, merge_conditions
from ..configdoc import ApiKeyView, GatewayView, PolicyView, effective_policy
from ..reconcile import plain
from ..runtime import Runtime
from ..settings import GROUP, SETTINGS, VERSION
from ..status import write_status


@kopf.index(GROUP, VERSION, "quotapolicies")
def policies_by_namespace(body: kopf.Body, **_: Any) -> dict[str, PolicyView]:
    view = PolicyView.from_body(body)
    return {view.namespace: view}


@kopf.on.event(GROUP, VERSION, "quotapolicies")
def changed(namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    assert namespace is not None  # every tollgate kind is namespaced
    memo.runtime.poke_namespace(namespace)


def users(
    namespace: str,
    policy: str,
    apikeys_by_gateway: kopf.Index[Any, Any],
    gateways_by_name: kopf.Index[Any, Any],
) -> list[ApiKeyView]:
    """ApiKeys (not being deleted) whose policy in force is `policy`."""
    found = []
    for (ns, gateway_name), keys in apikeys_by_gateway.items():
        if ns != namespace:
            continue
        gateway: GatewayView | None = next(iter(gateways_by_name.get((ns, gateway_name), [])), None)
        found += [k for k in keys if not k.deleting and effective_policy(k, gateway) == policy]
    return sorted(found, key=lambda k: k.name)


@kopf.timer(GROUP, VERSION, "quotapolicies", interval=SETTINGS.status_interval)
async def refresh(
    body: kopf.Body,
    namespace: str | None,
    name: str,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    apikeys_by_gateway: kopf.Index[Any, Any] = kwargs["apikeys_by_gateway"]
    gateways_by_name: kopf.Index[Any, Any] = kwargs["gateways_by_name"]
    assert namespace is not None  # every tollgate kind is namespaced
    keys = users(namespace, name, apikeys_by_gateway, gateways_by_name)
    await refresh_status(memo.runtime, namespace, name, keys, body=plain(body))


async def refresh_status(
    runtime: Runtime,
    namespace: str,
    name: str,
    keys: list[ApiKeyView],
    *,
    body: dict[str, Any] | None = None,
) -> None:
    """With `body` (the timer's, kopf's watched copy) nothing is read."""

    def compute(body: dict[str, Any]) -> dict[str, Any]:
        generation = int(body["metadata"].get("generation") or 1)
        current = body.get("status") or {}
        if keys:
            in_use = condition("InUse", True, "KeysAssigned", f"{len(keys)} key(s)")
        else:
            in_use = condition("InUse", False, "NoKeys", "no ApiKey uses this policy")
        return {
            "observedGeneration": generation,
            "keys": len(keys),
            "gateways": sorted({k.gateway for k in keys}),
            "conditions": merge_conditions(current.get("conditions"), [in_use], generation),
        }

    await write_status(runtime, QUOTA_POLICIES, namespace, name, compute, body=body)
