"""From cluster state to the gateway configuration document, as a pure function.

The document type is the gateway's own (`tollgate_contract.config`): imported, never
redefined. This module decides which keys a gateway accepts and why the others are left
out; the same decision feeds each ApiKey's Ready condition, so status and enforcement cannot
disagree. Rules, all fail-closed:

- a key that is being deleted, disabled or expired is left out (revoked);
- a key whose policy (its own, or the gateway's default) does not exist is left out
  (PolicyMissing): never silently unlimited;
- a key without readable material (Secret missing, empty, too short) is left out;
- two ApiKeys with the same key: the first by name wins, the other is left out.

`upstreams` (an InferencePool's ready pods, resolved by pools.py) is in the document only
for a gateway whose upstream is a pool; every other document has none, byte for byte as
before, so its version (and Secret) does not change.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tollgate_contract.config import GatewayConfig, KeySpec, Policy

from .keys import Material

# A QuotaPolicy's spec fields: the contract's Policy, by its document names.
POLICY_FIELDS = tuple(str(f.alias) for f in Policy.model_fields.values())


@dataclass(frozen=True)
class ApiKeyView:
    """What the operator indexes about an ApiKey (no key material)."""

    namespace: str
    name: str
    uid: str
    gateway: str
    policy: str | None
    disabled: bool
    expires_at: datetime.datetime | None
    models: tuple[str, ...] | None
    previous_valid_until: datetime.datetime | None
    deleting: bool
    generation: int = 1
    # Where the key lives: the user's Secret, or the generated <name>-key.
    secret_name: str = ""
    key_field: str = "key"
    previous_field: str = "previous"
    generated: bool = True
    rotation_id: str | None = None

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> ApiKeyView:
        meta, spec = body["metadata"], body.get("spec") or {}
        models = spec.get("models")
        ref = spec.get("secretRef") or {}
        return cls(
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta.get("uid", ""),
            gateway=spec.get("gateway", ""),
            policy=spec.get("policy") or None,
            disabled=bool(spec.get("disabled", False)),
            expires_at=parse_time(spec.get("expiresAt")),
            models=tuple(models) if models is not None else None,
            previous_valid_until=parse_time((spec.get("rotation") or {}).get("previousValidUntil")),
            deleting=bool(meta.get("deletionTimestamp")),
            generation=int(meta.get("generation") or 1),
            secret_name=ref.get("name") or f"{meta['name']}-key",
            key_field=ref.get("key") or "key",
            previous_field=ref.get("previousKey") or "previous",
            generated=not ref.get("name"),
            rotation_id=(spec.get("rotation") or {}).get("id"),
        )


@dataclass(frozen=True)
class PolicyView:
    namespace: str
    name: str
    limits: tuple[tuple[str, int], ...]
    deleting: bool

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> PolicyView:
        spec = body.get("spec") or {}
        limits = tuple((f, int(spec[f])) for f in POLICY_FIELDS if spec.get(f) is not None)
        meta = body["metadata"]
        return cls(meta["namespace"], meta["name"], limits, bool(meta.get("deletionTimestamp")))

    def to_policy(self) -> Policy:
        return Policy.model_validate(dict(self.limits))


@dataclass(frozen=True)
class GatewayView:
    namespace: str
    name: str
    uid: str
    default_policy: str | None
    has_database: bool
    deleting: bool = False
    # spec.upstream.inferencePool.name: the config names the replicas (None: the env does).
    inference_pool: str | None = None

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> GatewayView:
        meta, spec = body["metadata"], body.get("spec") or {}
        pool = ((spec.get("upstream") or {}).get("inferencePool") or {}).get("name")
        return cls(
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta.get("uid", ""),
            default_policy=spec.get("defaultPolicy") or None,
            has_database=bool((spec.get("database") or {}).get("urlSecretRef")),
            deleting=bool(meta.get("deletionTimestamp")),
            inference_pool=pool or None,
        )


@dataclass(frozen=True)
class Verdict:
    """Whether a key is in its gateway's config, and if not, why."""

    active: bool
    reason: str
    message: str
    policy: str | None = None


@dataclass
class Built:
    config: GatewayConfig
    verdicts: dict[str, Verdict] = field(default_factory=dict)  # by ApiKey name
    next_change: datetime.datetime | None = None  # an expiry or rotation deadline ahead


def parse_time(value: Any) -> datetime.datetime | None:
    if not value:
        return None
    if isinstance(value, datetime.datetime):
        stamp = value
    else:
        stamp = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=datetime.UTC)


def effective_policy(key: ApiKeyView, gateway: GatewayView | None) -> str | None:
    return key.policy or (gateway.default_policy if gateway else None)


def verdict(
    key: ApiKeyView,
    gateway: GatewayView | None,
    policies: Mapping[str, PolicyView],
    material: Material | Exception | None,
    now: datetime.datetime,
) -> Verdict:
    policy = effective_policy(key, gateway)
    if key.deleting:
        return Verdict(False, "Deleting", "the key is being deleted and is revoked", policy)
    if gateway is None:
        return Verdict(False, "GatewayMissing", f"InferenceGateway {key.gateway} not found", policy)
    if key.disabled:
        return Verdict(False, "Disabled", "spec.disabled is true: the key is revoked", policy)
    if key.expires_at is not None and key.expires_at <= now:
        return Verdict(False, "Expired", f"the key expired at {_fmt(key.expires_at)}", policy)
    if policy is not None and policy not in policies:
        return Verdict(
            False,
            "PolicyMissing",
            f"QuotaPolicy {policy} not found: the key is not accepted",
            policy,
        )
    if isinstance(material, Exception):
        return Verdict(False, getattr(material, "reason", "SecretError"), str(material), policy)
    if material is None:
        return Verdict(False, "SecretMissing", "the key's Secret is not there yet", policy)
    return Verdict(True, "Active", f"accepted by gateway {key.gateway}", policy)


def build(
    gateway: GatewayView,
    keys: Iterable[ApiKeyView],
    policies: Mapping[str, PolicyView],
    materials: Mapping[str, Material | Exception | None],
    now: datetime.datetime,
    upstreams: Sequence[str] | None = None,
) -> Built:
    """The document for one gateway; `materials` is by ApiKey uid; `upstreams` the
    replicas when the operator resolves them (None: the document names none)."""
    built = Built(GatewayConfig.model_validate({}))
    entries: dict[str, KeySpec] = {}
    used_policies: set[str] = set()
    horizon: list[datetime.datetime] = []
    for key in sorted(keys, key=lambda k: k.name):
        material = materials.get(key.uid)
        decision = verdict(key, gateway, policies, material, now)
        if decision.active:
            assert isinstance(material, Material)
            if material.hash in entries:
                decision = Verdict(
                    False,
                    "DuplicateKey",
                    f"the same key is already ApiKey {entries[material.hash].name}",
                    decision.policy,
                )
        built.verdicts[key.name] = decision
        if not decision.active:
            continue
        assert isinstance(material, Material)
        spec: dict[str, Any] = {"name": key.name, "policy": decision.policy}
        if key.models is not None:
            spec["models"] = list(key.models)
        if key.expires_at is not None:
            spec["expiresAt"] = key.expires_at
            horizon.append(key.expires_at)
        rotating = key.previous_valid_until is not None and key.previous_valid_until > now
        if material.previous_hash and rotating and material.previous_hash != material.hash:
            spec["previousHash"] = material.previous_hash
            spec["previousValidUntil"] = key.previous_valid_until
            horizon.append(key.previous_valid_until)  # type: ignore[arg-type]
        entries[material.hash] = KeySpec.model_validate(spec)
        if decision.policy is not None:
            used_policies.add(decision.policy)
    default = gateway.default_policy if gateway.default_policy in policies else None
    if default is not None:
        used_policies.add(default)
    built.config = GatewayConfig.model_validate(
        {
            "policies": {name: policies[name].to_policy() for name in sorted(used_policies)},
            "defaultPolicy": default,
            "keys": entries,
            "upstreams": None if upstreams is None else list(upstreams),
        }
    )
    future = [t for t in horizon if t > now]
    built.next_change = min(future) if future else None
    return built


def _fmt(stamp: datetime.datetime) -> str:
    return stamp.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
