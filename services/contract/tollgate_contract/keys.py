"""How a plain key becomes what the rest of the system knows of it.

The gateway indexes keys by their SHA-256 hex digest and the operator writes that digest
into the config document; both must compute it the same way, so it is defined here. The
fingerprint is the short, safe-to-show prefix that names a key in status and in the
default key names.
"""

from __future__ import annotations

import hashlib

FINGERPRINT_LENGTH = 12


def key_hash(key: str | bytes) -> str:
    raw = key.encode() if isinstance(key, str) else key
    return hashlib.sha256(raw).hexdigest()


def fingerprint(digest: str) -> str:
    """A short identifier of a key: a prefix of its hash (not enough to find the key)."""
    return digest[:FINGERPRINT_LENGTH]
