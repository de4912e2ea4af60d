"""The gateway configuration document.

The operator writes it into the config Secret (data key `CONFIG_SECRET_KEY`), which the
gateway mounts (`GATEWAY_CONFIG_FILE`) and watches; the gateway validates it and swaps it in
without a restart. JSON, versioned by `apiVersion`:

    {
      "apiVersion": "tollgate.dev/v1alpha1",
      "kind": "GatewayConfig",
      "policies": {
        "standard": {"requestsPerMinute": 600, "tokensPerMinute": 100000,
                     "tokensPerDay": 2000000, "maxConcurrentRequests": 16, "priority": 0}
      },
      "defaultPolicy": "standard",
      "models": {
        "llama": {"upstream": "meta-llama/Llama-3.1-8B-Instruct", "fallback": "llama-small"}
      },
      "upstreams": ["http://10.0.3.7:8000", "http://10.0.4.2:8000"],
      "keys": {
        "<sha256 hex of the key>": {
          "name": "team-a", "policy": "standard", "models": ["llama-3-8b"],
          "disabled": false, "expiresAt": "2027-01-01T00:00:00Z",
          "previousHash": "<sha256 of the key being rotated out>",
          "previousValidUntil": "2026-12-01T00:00:00Z"
        }
      }
    }

Keys appear only as SHA-256 hashes. A key's `name` is its identity for quotas, logs and
metrics (unique in the document; a rotated key keeps its name, so its usage carries over).
Limits left out (or null) are unlimited; a key without `policy` gets `defaultPolicy`, and a
key naming a policy the document lacks is rejected (never silently unlimited).
`upstreams`, when present, are the replicas' base URLs as the operator resolved them (an
InferencePool's ready pods) and replace the gateway's own `VLLM_URL(S)`; an empty list is
a pool with no ready pod.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from datetime import datetime
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

API_VERSION: Final = "tollgate.dev/v1alpha1"
# The data key of the config Secret that holds the document.
CONFIG_SECRET_KEY: Final = "config.json"
KIND: Final = "GatewayConfig"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# A replica's base URL: scheme, host (a name, IPv4 or [IPv6]) and port, nothing more.
_BASE_URL = re.compile(r"^https?://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$")
NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"


def replica_url(address: str, port: int) -> str | None:
    """A replica's base URL from an address the cluster gave (a pod IP, a DNS answer), in
    the form `upstreams` requires: an IPv6 address in brackets. None for what is not a
    plain IP (a zone is no pod address, and no valid URL host)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        return None
    host = f"[{ip.compressed}]" if ip.version == 6 else ip.compressed
    return f"http://{host}:{port}"


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class Policy(_Model):
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    tokens_per_day: int | None = Field(None, ge=1)
    max_concurrent_requests: int | None = Field(None, ge=1)
    # When every replica is full: the key's share of the places (1 + priority per turn);
    # -1: sheddable, refused instead of queued. Unset is 0 (and leaves documents written
    # before the field byte for byte the same).
    priority: int | None = Field(default=None, ge=-1, le=9)


class KeySpec(_Model):
    name: str = Field(pattern=NAME_PATTERN)
    policy: str | None = None
    # None: every model; a list: only these (others get 403).
    models: list[str] | None = None
    disabled: bool = False
    expires_at: datetime | None = None
    # Rotation: the key being replaced keeps working until `previous_valid_until`.
    previous_hash: str | None = None
    previous_valid_until: datetime | None = None

    @model_validator(mode="after")
    def _check(self) -> KeySpec:
        if self.previous_hash is not None and not _SHA256.match(self.previous_hash):
            raise ValueError("previousHash must be a lowercase SHA-256 hex digest")
        if (self.previous_hash is None) != (self.previous_valid_until is None):
            raise ValueError("previousHash and previousValidUntil go together")
        for stamp in (self.expires_at, self.previous_valid_until):
            if stamp is not None and stamp.tzinfo is None:
                raise ValueError("timestamps need a timezone (e.g. 2026-12-01T00:00:00Z)")
        return self


class ModelRoute(_Model):
    """A model name clients use. `upstream`: the model vLLM serves under it (default: the
    same name); `fallback`: a model to answer from while this one has no available
    replica (all down, or their breakers open), followed one step, never further."""

    upstream: str | None = Field(None, min_length=1)
    fallback: str | None = Field(None, min_length=1)


class GatewayConfig(_Model):
    api_version: Literal["tollgate.dev/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["GatewayConfig"] = KIND
    policies: dict[str, Policy] = {}
    default_policy: str | None = None
    keys: dict[str, KeySpec] = {}
    # Model names clients use, by name: aliases and fallbacks.
    models: dict[str, ModelRoute] = {}
    # The replicas, when the operator resolves them; None: the gateway's settings decide.
    upstreams: list[str] | None = None

    @model_validator(mode="after")
    def _check(self) -> GatewayConfig:
        if self.default_policy is not None and self.default_policy not in self.policies:
            raise ValueError(f"defaultPolicy {self.default_policy!r} is not in policies")
        names: set[str] = set()
        for digest, key in self.keys.items():
            if not _SHA256.match(digest):
                raise ValueError(f"key {key.name!r}: keys are indexed by SHA-256 hex digests")
            if key.policy is not None and key.policy not in self.policies:
                raise ValueError(f"key {key.name!r}: policy {key.policy!r} is not in policies")
            if key.name in names:
                raise ValueError(f"key name {key.name!r} appears twice")
            names.add(key.name)
        for name, route in self.models.items():
            if route.fallback == name:
                raise ValueError(f"model {name!r} cannot be its own fallback")
        for base in self.upstreams or ():
            if not _BASE_URL.match(base):
                raise ValueError(f"upstream {base!r} is not http(s)://host:port")
        return self

    def policy_for(self, key: KeySpec) -> Policy | None:
        name = key.policy or self.default_policy
        return self.policies[name] if name is not None else None

    def to_json(self) -> bytes:
        """Canonical bytes: the same content always gives the same bytes (and hash), so
        the operator never rewrites a Secret whose content did not change."""
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    def version(self) -> str:
        return hashlib.sha256(self.to_json()).hexdigest()[:16]


def parse(raw: bytes | str) -> GatewayConfig:
    """Validate a document; raises ValueError (pydantic's ValidationError) with the reason."""
    return GatewayConfig.model_validate_json(raw)
