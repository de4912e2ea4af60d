"""QuotaPolicy: limits that reach every gateway whose keys use the policy.

A policy has no children: its limits are copied into the config Secret of each gateway
with a key that uses it (the writers are poked on every change, and the gateway reloads the
document in place, so no pod restarts). Deleting a policy that keys still use is blocked by
the finalizer until no key uses it; the policy says so in its status and in an Event.
"""

from __future__ import annotations

from typing import Any

import kopf

from ..client import QUOTA_POLICIES
from ..conditions import condition, merge_conditions, status_patch
from ..configdoc import ApiKeyView, GatewayView, PolicyView, effective_policy
from ..runtime import Runtime
from ..settings import GROUP, SETTINGS, VERSION


@kopf.index(GROUP, VERSION, "quotapolicies")
def policies_by_namespace(body: kopf.Body, **_: Any) -> dict[str, PolicyView]:
    view = PolicyView.from_body(body)
    return {view.namespace: view}


@kopf.on.event(GROUP, VERSION, "quotapolicies")
def changed(namespace: str, memo: kopf.Memo, **_: Any) -> None:
    memo.runtime.poke_namespace(namespace)


def users(
    namespace: str, policy: str, apikeys_by_gateway: kopf.Index, gateways_by_name: kopf.Index
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
    namespace: str,
    name: str,
    memo: kopf.Memo,
    apikeys_by_gateway: kopf.Index,
    gateways_by_name: kopf.Index,
    **_: Any,
) -> None:
    keys = users(namespace, name, apikeys_by_gateway, gateways_by_name)
    await refresh_status(memo.runtime, namespace, name, keys, deleting=False)


@kopf.on.delete(GROUP, VERSION, "quotapolicies", backoff=SETTINGS.status_interval)
async def guard(
    body: kopf.Body,
    namespace: str,
    name: str,
    memo: kopf.Memo,
    apikeys_by_gateway: kopf.Index,
    gateways_by_name: kopf.Index,
    **_: Any,
) -> None:
    """Never leave keys silently unlimited: hold the policy while keys use it."""
    runtime: Runtime = memo.runtime
    keys = users(namespace, name, apikeys_by_gateway, gateways_by_name)
    if keys:
        names = ", ".join(k.name for k in keys[:10]) + (" ..." if len(keys) > 10 else "")
        await refresh_status(runtime, namespace, name, keys, deleting=True)
        message = f"deletion waits: ApiKeys still use this policy: {names}"
        kopf.warn(body, reason="PolicyInUse", message=message)
        raise kopf.TemporaryError(message, delay=min(5.0, SETTINGS.status_interval))
    runtime.poke_namespace(namespace)


async def refresh_status(
    runtime: Runtime, namespace: str, name: str, keys: list[ApiKeyView], *, deleting: bool
) -> None:
    client = runtime.client
    async with runtime.locks[("qp", namespace, name)]:
        body = await client.get(QUOTA_POLICIES, namespace, name)
        if body is None:
            return
        generation = int(body["metadata"].get("generation") or 1)
        current = body.get("status") or {}
        if deleting:
            in_use = condition("InUse", True, "DeletionBlocked", "keys still use this policy")
        elif keys:
            in_use = condition("InUse", True, "KeysAssigned", f"{len(keys)} key(s)")
        else:
            in_use = condition("InUse", False, "NoKeys", "no ApiKey uses this policy")
        wanted = {
            "observedGeneration": generation,
            "keys": len(keys),
            "gateways": sorted({k.gateway for k in keys}),
            "conditions": merge_conditions(current.get("conditions"), [in_use], generation),
        }
        patch = status_patch(current, wanted)
        if patch:
            await client.patch(QUOTA_POLICIES, namespace, name, {"status": patch}, status=True)
