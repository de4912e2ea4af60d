"""Client keys, known only by their SHA-256 hashes, with what each may do.

Plain keys are hashed as soon as they are read and dropped; a lookup hashes the presented
key and looks the hash up in a dict. Names (never keys or hashes) are what logs and
metrics show, and what quotas are counted by. A `KeyRing` is immutable: a configuration
reload builds a new one and swaps it in, so in-flight requests keep the key they had.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from tollgate_contract.config import GatewayConfig, Policy

_NAMED = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,62}):(.+)$")


def key_hash(key: str | bytes) -> str:
    raw = key.encode() if isinstance(key, str) else key
    return hashlib.sha256(raw).hexdigest()


def fingerprint(digest: str) -> str:
    """A short, safe-to-show identifier of a key: a prefix of its hash."""
    return digest[:12]


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    digest: str
    policy: Policy | None = None
    # None: every model.
    models: frozenset[str] | None = None
    disabled: bool = False
    # Unix time after which the key stops working; None: never.
    expires_at: float | None = None

    def refusal(self, now: float) -> str | None:
        """Why this (known) key may not be used now, if it may not."""
        if self.disabled:
            return "This API key is disabled."
        if self.expires_at is not None and now >= self.expires_at:
            return "This API key has expired."
        return None


def env_keys(entries: Iterable[str], policy: Policy | None) -> list[ApiKey]:
    """`GATEWAY_API_KEYS` entries: `key`, or `name:key` to name it."""
    keys = []
    for entry in entries:
        match = _NAMED.match(entry)
        name, key = (match.group(1), match.group(2)) if match else (None, entry)
        digest = key_hash(key)
        keys.append(ApiKey(name or f"key-{fingerprint(digest)}", digest, policy))
    return keys


def config_keys(config: GatewayConfig) -> list[ApiKey]:
    """The keys of a configuration document; a rotated key's previous hash is a second
    entry with the same name, valid until the rotation's deadline."""
    keys = []
    for digest, spec in config.keys.items():
        policy = config.policy_for(spec)
        models = frozenset(spec.models) if spec.models is not None else None
        expires = spec.expires_at.timestamp() if spec.expires_at else None
        keys.append(ApiKey(spec.name, digest, policy, models, spec.disabled, expires))
        if spec.previous_hash and spec.previous_valid_until:
            until = spec.previous_valid_until.timestamp()
            if expires is not None:
                until = min(until, expires)
            keys.append(ApiKey(spec.name, spec.previous_hash, policy, models, spec.disabled, until))
    return keys


class KeyRing:
    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        # Later entries win: configuration-file keys are passed after environment keys.
        self._by_hash = {key.digest: key for key in keys}

    def __len__(self) -> int:
        return len(self._by_hash)

    def names(self) -> set[str]:
        return {key.name for key in self._by_hash.values()}

    def models(self) -> set[str]:
        """Every model some key's allow-list names."""
        return {m for key in self._by_hash.values() if key.models for m in key.models}

    def authenticate(self, authorization: bytes | None) -> ApiKey | None:
        """The key behind an `Authorization: Bearer <key>` header value, if known."""
        if not authorization or authorization[:7].lower() != b"bearer ":
            return None
        presented = authorization[7:].strip()
        if not presented:
            return None
        return self._by_hash.get(hashlib.sha256(presented).hexdigest())
