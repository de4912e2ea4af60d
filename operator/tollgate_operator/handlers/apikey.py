"""ApiKey: key material in a Secret, its hash in the gateway config, status with usage.

The handlers here own the key Secret (generated and rotated when the user brings none) and
the ApiKey's status. Whether a key is in its gateway's config is decided by the gateway's
ConfigWriter; status reports that decision as it was written (`Ready` means "the config
Secret accepts this key now").
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, cast

import kopf

from tollgate_contract.keys import fingerprint

from .. import children, metrics
from ..client import API_KEYS, SECRETS, ApiError
from ..conditions import condition, merge_conditions
from ..configdoc import ApiKeyView, Verdict
from ..keys import CURRENT, PREVIOUS, Material, MaterialError, decode, generate
from ..reconcile import plain
from ..runtime import GatewayKey, Runtime
from ..settings import GROUP, SETTINGS, VERSION
from ..status import write_status
from ..usage import usage_status

log = logging.getLogger(__name__)
_PENDING = Verdict(False, "Pending", "waiting for the gateway config to be written")


@kopf.index(GROUP, VERSION, "apikeys")
def apikeys_by_gateway(body: kopf.Body, **_: Any) -> dict[tuple[str, str], ApiKeyView]:
    view = ApiKeyView.from_body(body)
    return {(view.namespace, view.gateway): view}


@kopf.index(GROUP, VERSION, "apikeys")
def apikeys_by_secret(body: kopf.Body, **_: Any) -> dict[tuple[str, str], ApiKeyView]:
    """Which ApiKeys read which Secret: Secret events update their material."""
    view = ApiKeyView.from_body(body)
    return {(view.namespace, view.secret_name): view}


@kopf.on.event("", "v1", "secrets")
def key_secret_changed(
    type: str | None, body: kopf.Body, namespace: str | None, name: str, memo: Any, **kwargs: Any
) -> None:
    """A key Secret was created, edited (its value, or its opt-in label) or deleted: the
    keys reading it see that through the watch kopf already holds on Secrets, not through
    a GET per key per status interval. Secrets no ApiKey names are ignored."""
    if namespace is None:
        return
    runtime: Runtime = memo.runtime
    # What the gateways' status needs to know of the Secrets they reference (names of the
    # data keys that hold something), so their refresh reads no Secret.
    data = {} if type == "DELETED" else (body.get("data") or {})
    runtime.secret_keys[(namespace, name)] = (
        None if type == "DELETED" else frozenset(k for k, v in data.items() if v)
    )
    index: kopf.Index[Any, ApiKeyView] = kwargs["apikeys_by_secret"]
    views = list(index.get((namespace, name), []))
    if not views:
        return
    secret = None if type == "DELETED" else plain(body)
    changed = False
    for view in views:
        before = runtime.materials.get(view.uid)
        changed |= not _same(before, runtime.remember(view, secret))
    if changed:
        runtime.poke_namespace(namespace)


def _same(a: Material | MaterialError | None, b: Material | MaterialError | None) -> bool:
    if isinstance(a, MaterialError) and isinstance(b, MaterialError):
        return (a.reason, str(a)) == (b.reason, str(b))
    return a == b


@kopf.on.event(GROUP, VERSION, "apikeys")
def changed(type: str | None, uid: str, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    """Any change may change a gateway config: poke. A deleted key is revoked by that
    poke (the writer rebuilds from the index, which no longer holds it): no finalizer, so
    deleting a namespace or uninstalling never waits on the operator."""
    assert namespace is not None  # every tollgate kind is namespaced
    runtime: Runtime = memo.runtime
    if type == "DELETED":
        runtime.materials.pop(uid, None)
    runtime.poke_namespace(namespace)


@kopf.on.resume(GROUP, VERSION, "apikeys", backoff=5)
@kopf.on.create(GROUP, VERSION, "apikeys", backoff=5)
@kopf.on.update(GROUP, VERSION, "apikeys", backoff=5)
async def reconcile(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    gateways_by_name: kopf.Index[Any, Any] = kwargs["gateways_by_name"]
    runtime: Runtime = memo.runtime
    runtime.gateway_index = gateways_by_name
    key = ApiKeyView.from_body(body)
    with metrics.reconcile("ApiKey"):
        secret = await ensure_key_secret(runtime, body, key)
        runtime.remember(key, secret)
        runtime.poke_namespace(key.namespace)
        await refresh_status(runtime, key.namespace, key.name)


@kopf.timer(GROUP, VERSION, "apikeys", interval=SETTINGS.status_interval)
async def refresh(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    """Refresh status (expiry, usage, policy changes) from the body kopf already holds:
    no GET, and no write when nothing changed. Secret edits arrive by watch
    (key_secret_changed)."""
    gateways_by_name: kopf.Index[Any, Any] = kwargs["gateways_by_name"]
    runtime: Runtime = memo.runtime
    runtime.gateway_index = gateways_by_name
    key = ApiKeyView.from_body(body)
    await refresh_status(runtime, key.namespace, key.name, body=_as_dict(body))


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


async def refresh_status(
    runtime: Runtime, namespace: str, name: str, body: dict[str, Any] | None = None
) -> None:
    """Compute the whole status and patch what differs (nothing, usually). With `body`
    (the object as kopf last saw it) nothing is read from the API."""
    decisions: list[Verdict] = []

    def compute(body: dict[str, Any]) -> dict[str, Any] | None:
        key = ApiKeyView.from_body(body)
        writer = runtime.writers.get(GatewayKey(namespace, key.gateway))
        if not runtime.gateway_alive(namespace, key.gateway):
            decision = Verdict(False, "GatewayMissing", f"InferenceGateway {key.gateway} not found")
        elif writer is None or not writer.synced:
            return None  # the writer's first pass reports every key; do not flap to Pending
        else:
            decision = writer.verdicts.get(name, _PENDING)
        decisions.append(decision)
        material = runtime.materials.get(key.uid)
        # Only a generated key shows a fingerprint: for a user's Secret it would tell
        # whoever reads the ApiKey 48 bits of the hash of a value they may not read.
        shown = material if isinstance(material, Material) and key.generated else None
        day = runtime.usage.get(GatewayKey(namespace, key.gateway))
        usage = day.keys.get(name) if day is not None else None
        current = body.get("status") or {}
        ready = condition("Ready", decision.active, decision.reason, decision.message)
        return {
            "observedGeneration": key.generation,
            "secretName": key.secret_name,
            "fingerprint": fingerprint(shown.hash) if shown else None,
            "previousFingerprint": (
                fingerprint(shown.previous_hash) if shown and shown.previous_hash else None
            ),
            "policy": decision.policy,
            "usage": usage_status(day.day, usage) if day is not None and usage else None,
            "conditions": merge_conditions(current.get("conditions"), [ready], key.generation),
        }

    seen = await write_status(runtime, API_KEYS, namespace, name, compute, body=body)
    if seen is None or not decisions:
        return
    decision = decisions[0]
    current = seen.get("status") or {}
    was = {c.get("type"): c for c in current.get("conditions") or []}.get("Ready", {})
    if was.get("reason") != decision.reason and decision.reason != "Pending":
        kind = "Normal" if decision.active else "Warning"
        kopf.event(
            cast(kopf.Body, seen), type=kind, reason=decision.reason, message=decision.message
        )


async def refresh_many(runtime: Runtime, namespace: str, names: Iterable[str]) -> None:
    """The writer's hook: these keys' verdicts or usage changed."""
    for name in names:
        try:
            await refresh_status(runtime, namespace, name)
        except ApiError as exc:
            log.warning("status of ApiKey %s/%s not refreshed: %s", namespace, name, exc)


def _as_dict(body: kopf.Body) -> dict[str, Any]:
    result: dict[str, Any] = plain(body)
    return result
