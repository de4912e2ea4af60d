"""ApiKey: key material in a Secret, its hash in the gateway config, status with usage.

The handlers here own the key Secret (generated and rotated when the user brings none) and
the ApiKey's status. Whether a key is in its gateway's config is decided by the gateway's
ConfigWriter; status reports that decision as it was written (`Ready` means "the config
Secret accepts this key now").
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import kopf

from .. import children
from ..client import API_KEYS, SECRETS, ApiError
from ..conditions import condition, merge_conditions, status_patch
from ..configdoc import ApiKeyView, Verdict
from ..keys import CURRENT, PREVIOUS, Material, decode, fingerprint, generate
from ..reconcile import plain
from ..runtime import Runtime
from ..settings import GROUP, SETTINGS, VERSION

log = logging.getLogger(__name__)
_PENDING = Verdict(False, "Pending", "waiting for the gateway config to be written")


@kopf.index(GROUP, VERSION, "apikeys")
def apikeys_by_gateway(body: kopf.Body, **_: Any) -> dict[tuple[str, str], ApiKeyView]:
    view = ApiKeyView.from_body(body)
    return {(view.namespace, view.gateway): view}


@kopf.on.event(GROUP, VERSION, "apikeys")
def changed(namespace: str, memo: kopf.Memo, **_: Any) -> None:
    """Any change (including deletion marks) may change a gateway config: poke."""
    memo.runtime.poke_namespace(namespace)


@kopf.on.resume(GROUP, VERSION, "apikeys", backoff=5)
@kopf.on.create(GROUP, VERSION, "apikeys", backoff=5)
@kopf.on.update(GROUP, VERSION, "apikeys", backoff=5)
async def reconcile(
    body: kopf.Body, memo: kopf.Memo, gateways_by_name: kopf.Index, **_: Any
) -> None:
    runtime: Runtime = memo.runtime
    runtime.gateway_index = gateways_by_name
    key = ApiKeyView.from_body(body)
    secret = await ensure_key_secret(runtime, body, key)
    runtime.remember(key, secret)
    runtime.poke_namespace(key.namespace)
    await refresh_status(runtime, key.namespace, key.name)


@kopf.timer(GROUP, VERSION, "apikeys", interval=SETTINGS.status_interval)
async def refresh(body: kopf.Body, memo: kopf.Memo, gateways_by_name: kopf.Index, **_: Any) -> None:
    """Re-read a user's Secret (it may have been edited) and refresh status: expiry,
    usage, policy changes. Writes nothing when nothing changed."""
    runtime: Runtime = memo.runtime
    runtime.gateway_index = gateways_by_name
    key = ApiKeyView.from_body(body)
    before = runtime.materials.get(key.uid)
    after = await runtime.load_material(key)
    if after != before:
        runtime.poke_namespace(key.namespace)
    await refresh_status(runtime, key.namespace, key.name)


@kopf.on.delete(GROUP, VERSION, "apikeys", backoff=1)
async def revoke(body: kopf.Body, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    """The finalizer holds the ApiKey until its hash is gone from the config Secret, so
    `kubectl delete apikey` returns when the key is revoked."""
    runtime: Runtime = memo.runtime
    key = ApiKeyView.from_body(body)
    writer = runtime.writers.get((key.namespace, key.gateway))
    if writer is not None and not await writer.wait_revoked(key.name, within=5.0):
        raise kopf.TemporaryError("the config Secret still accepts this key", delay=1)
    runtime.materials.pop(key.uid, None)
    logger.info("key %s revoked", key.name)


async def ensure_key_secret(
    runtime: Runtime, body: kopf.Body, key: ApiKeyView
) -> dict[str, Any] | None:
    """The Secret that holds the key. A user's Secret is only read. A generated one is
    created when missing and rotated when spec.rotation.id changes; a Secret of that name
    that this ApiKey does not own is left alone (SecretConflict)."""
    client = runtime.client
    secret = await client.get(SECRETS, key.namespace, key.secret_name)
    if not key.generated:
        return secret
    if secret is None:
        manifest = children.key_secret(
            _as_dict(body), {CURRENT: generate().encode()}, key.rotation_id
        )
        try:
            secret = await client.create(SECRETS, key.namespace, manifest)
        except ApiError as exc:
            if exc.status != 409:
                raise
            return await client.get(SECRETS, key.namespace, key.secret_name)
        kopf.info(body, reason="KeyGenerated", message=f"generated a key into {key.secret_name}")
        return secret
    owners = secret["metadata"].get("ownerReferences") or []
    if not any(ref.get("uid") == key.uid for ref in owners):
        return secret
    annotations = secret["metadata"].get("annotations") or {}
    if key.rotation_id and annotations.get("tollgate.dev/rotation-id") != key.rotation_id:
        current = decode(secret, CURRENT) or ""
        data = {CURRENT: generate().encode(), PREVIOUS: current.encode()}
        manifest = children.key_secret(_as_dict(body), data, key.rotation_id)
        secret = await client.patch(
            SECRETS,
            key.namespace,
            key.secret_name,
            {
                "metadata": {"annotations": manifest["metadata"]["annotations"]},
                "data": manifest["data"],
            },
        )
        until = ((body.get("spec") or {}).get("rotation") or {}).get("previousValidUntil")
        message = f"new key in {key.secret_name}; the old one works until {until}"
        kopf.info(body, reason="KeyRotated", message=message)
    return secret


async def refresh_status(runtime: Runtime, namespace: str, name: str) -> None:
    """Compute the whole status and patch what differs (nothing, usually)."""
    client = runtime.client
    async with runtime.locks[("ak", namespace, name)]:
        body = await client.get(API_KEYS, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        key = ApiKeyView.from_body(body)
        writer = runtime.writers.get((namespace, key.gateway))
        if not runtime.gateway_alive(namespace, key.gateway):
            decision = Verdict(False, "GatewayMissing", f"InferenceGateway {key.gateway} not found")
        elif writer is None or not writer.synced:
            return  # the writer's first pass reports every key; do not flap to Pending
        else:
            decision = writer.verdicts.get(name, _PENDING)
        material = runtime.materials.get(key.uid)
        usage = runtime.usage.get((namespace, key.gateway), {}).get(name)
        current = body.get("status") or {}
        ready = condition("Ready", decision.active, decision.reason, decision.message)
        wanted: dict[str, Any] = {
            "observedGeneration": key.generation,
            "secretName": key.secret_name,
            "fingerprint": fingerprint(material.hash) if isinstance(material, Material) else None,
            "previousFingerprint": (
                fingerprint(material.previous_hash)
                if isinstance(material, Material) and material.previous_hash
                else None
            ),
            "policy": decision.policy,
            "usage": usage.as_status() if usage is not None else None,
            "conditions": merge_conditions(current.get("conditions"), [ready], key.generation),
        }
        patch = status_patch(current, wanted)
        if not patch:
            return
        await client.patch(API_KEYS, namespace, name, {"status": patch}, status=True)
    was = {c.get("type"): c for c in current.get("conditions") or []}.get("Ready", {})
    if was.get("reason") != decision.reason and decision.reason != "Pending":
        kind = "Normal" if decision.active else "Warning"
        kopf.event(body, type=kind, reason=decision.reason, message=decision.message)


async def refresh_many(runtime: Runtime, namespace: str, names: Iterable[str]) -> None:
    """The writer's hook: these keys' verdicts or usage changed."""
    for name in names:
        try:
            await refresh_status(runtime, namespace, name)
        except ApiError as exc:
            log.warning("status of ApiKey %s/%s not refreshed: %s", namespace, name, exc)


def _as_dict(body: kopf.Body) -> dict[str, Any]:
    return plain(body)
