"""Client keys, known only by their SHA-256 hashes.

Plain keys are hashed as soon as they are read and dropped; a lookup hashes the presented
key and looks the hash up in a dict. Names (never keys or hashes) are what logs and
metrics show.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

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


class KeyRing:
    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        self._by_hash = {key.digest: key for key in keys}

    @classmethod
    def from_entries(cls, entries: Iterable[str]) -> KeyRing:
        """`GATEWAY_API_KEYS` entries: `key`, or `name:key` to name it."""
        keys = []
        for entry in entries:
            match = _NAMED.match(entry)
            name, key = (match.group(1), match.group(2)) if match else (None, entry)
            digest = key_hash(key)
            keys.append(ApiKey(name or f"key-{fingerprint(digest)}", digest))
        return cls(keys)

    def __len__(self) -> int:
        return len(self._by_hash)

    def authenticate(self, authorization: bytes | None) -> ApiKey | None:
        """The key behind an `Authorization: Bearer <key>` header value, if known."""
        if not authorization or authorization[:7].lower() != b"bearer ":
            return None
        presented = authorization[7:].strip()
        if not presented:
            return None
        return self._by_hash.get(hashlib.sha256(presented).hexdigest())
