"""Key material: generate it, read it from Secrets, and reduce it to hashes.

Plain keys live only in Secrets; this module is the one place the operator holds them, and
only long enough to hash them. Hash and fingerprint are the contract's (`tollgate_contract.
keys`), so the gateway and the operator compute them the same way.

A Secret the user brings is read only when it opts in (label `OPT_IN_LABEL: "true"`):
otherwise whoever may create ApiKeys could probe every Secret of the namespace (does it
exist, is its value long enough, what is its hash). A Secret that is missing and one that
has not opted in look the same from the ApiKey, and only generated keys show a fingerprint
in status.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from typing import Any

from tollgate_contract.keys import key_hash

KEY_PREFIX = "sk-tg-"
CURRENT = "key"
PREVIOUS = "previous"
MIN_KEY_LENGTH = 16


def generate() -> str:
    """256 random bits, URL-safe, with a recognisable prefix (secret scanners can match)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


OPT_IN_LABEL = "tollgate.dev/api-key"


def opted_in(secret: dict[str, Any]) -> bool:
    labels = (secret.get("metadata") or {}).get("labels") or {}
    return labels.get(OPT_IN_LABEL) == "true"


@dataclass(frozen=True)
class Material:
    """What the config needs from a key Secret: hashes only."""

    hash: str
    previous_hash: str | None
    secret_name: str


class MaterialError(Exception):
    """The Secret cannot give a usable key; `reason` becomes the condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def decode(secret: dict[str, Any], field: str) -> str | None:
    raw = (secret.get("data") or {}).get(field)
    if raw is None:
        plain = (secret.get("stringData") or {}).get(field)
        return plain.strip() if plain else None
    try:
        return base64.b64decode(raw).decode().strip() or None
    except (ValueError, UnicodeDecodeError):
        return None


def material_from_secret(secret: dict[str, Any], key_field: str, previous_field: str) -> Material:
    name = secret["metadata"]["name"]
    key = decode(secret, key_field)
    if key is None:
        raise MaterialError("SecretKeyMissing", f"Secret {name} has no data key {key_field!r}")
    if len(key) < MIN_KEY_LENGTH:
        raise MaterialError("WeakKey", f"the key in Secret {name} is under {MIN_KEY_LENGTH} chars")
    previous = decode(secret, previous_field)
    return Material(key_hash(key), key_hash(previous) if previous else None, name)
