"""The configuration document on disk: loaded at start, reloaded when it changes.

The file is polled with `os.stat` (inode, size, mtime) every `poll_interval` seconds.
Polling follows symlinks, so it sees the way Kubernetes updates a mounted Secret (the
`..data` symlink is swapped to a new directory; the file's inode changes) as well as an
editor's in-place write, with no inotify edge cases. An in-place write that changes no
stat field (same size, and an mtime restored by `cp -p`/`rsync -t` or within the
filesystem's granularity) is caught by also comparing the bytes now and then: every poll
for a file up to `CONTENT_CHECK_BYTES`, every `size / CONTENT_CHECK_BYTES` polls for a
bigger one, so a poll reads that much on average (a 10,000-key document, 1.4 MB, is
compared every 22 polls, 5.5 s). Bytes equal to the last read are not parsed again.

A reload builds a new `KeyRing` and hands it over in one assignment: in-flight requests
keep the key object they have. An invalid document is logged, counted, and ignored; the
last good one stays.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from tollgate_contract.config import GatewayConfig, Policy, parse
from tollgate_gateway.keys import ApiKey, KeyRing, config_keys
from tollgate_gateway.models import ModelRoutes

log = logging.getLogger("tollgate.config")

# The bytes a poll may read, on average, to compare the file's content.
CONTENT_CHECK_BYTES = 64 * 1024


class ConfigError(Exception):
    pass


class CurrentConfig:
    """The configuration in use: the key ring, the model routes and the version they came
    from. The watcher swaps all three in one call; readers take them once per request."""

    def __init__(self) -> None:
        self.ring = KeyRing()
        self.models = ModelRoutes()
        self.version = ""

    def use(self, ring: KeyRing, version: str, models: ModelRoutes) -> None:
        self.ring, self.version, self.models = ring, version, models


class ConfigWatcher:
    def __init__(
        self,
        path: str | None,
        env_keys: list[ApiKey],
        on_change: Callable[[KeyRing, str, ModelRoutes, list[str] | None], None],
        poll_interval: float = 0.25,
    ) -> None:
        self.path = Path(path) if path else None
        self.env_keys = env_keys
        self.on_change = on_change
        self.poll_interval = poll_interval
        self.version = "env"
        self.reloads_ok = 0
        self.reloads_failed = 0
        # Whether the last document seen (file or API) was valid: a rejected one stays
        # "pending" until a valid one arrives, and this says so.
        self.last_ok = True
        self._signature: tuple[int, ...] | None = None
        self._raw: bytes | None = None  # the file's bytes at the last read, if it was read
        self._polls_unread = 0  # polls since the bytes were last compared

    def load(self) -> None:
        """The first load: a broken document here stops the start (there is no last good)."""
        if self.path is None:
            self.on_change(KeyRing(self.env_keys), self.version, ModelRoutes(), None)
            return
        try:
            self._signature = self._stat()
            self._raw = self.path.read_bytes()
            config = parse(self._raw)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"GATEWAY_CONFIG_FILE {self.path}: {exc}") from None
        self._apply(config, "file")

    async def watch(self) -> None:
        if self.path is None:
            return
        while True:
            await asyncio.sleep(self.poll_interval)
            self.check()

    def check(self) -> None:
        """One poll: re-read the file if its stat changed, or if its bytes are due a
        comparison; apply what differs from the last read."""
        assert self.path is not None
        try:
            signature = self._stat()
        except OSError:
            signature = None
        changed = signature != self._signature
        if not changed and not self._compare_due(signature):
            return
        self._signature = signature
        self._polls_unread = 0
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            if changed or self._raw is not None:  # once per change, not once per poll
                self._rejected(exc, "file")
            self._raw = None
            return
        if raw == self._raw:
            return  # touched, or rewritten with the same bytes
        self._raw = raw
        self.apply_bytes(raw, source="file")

    def _compare_due(self, signature: tuple[int, ...] | None) -> bool:
        if signature is None:
            return False
        self._polls_unread += 1
        return self._polls_unread * CONTENT_CHECK_BYTES >= signature[2]

    def apply_bytes(self, raw: bytes, source: str) -> None:
        """A new document from the file or the API: applied if valid and different."""
        try:
            config = parse(raw)
        except ValueError as exc:
            self._rejected(exc, source)
            return
        self.last_ok = True
        if config.version() == self.version:
            return  # the other source already brought this one
        self._apply(config, source)
        self.reloads_ok += 1

    def _rejected(self, exc: Exception, source: str) -> None:
        self.reloads_failed += 1
        self.last_ok = False
        log.error(
            "configuration rejected; keeping the last good one",
            extra={
                "event": "config_reload",
                "ok": False,
                "source": source,
                "error": _first_line(exc),
                "version": self.version,
            },
        )

    def _apply(self, config: GatewayConfig, source: str) -> None:
        keys = KeyRing([*self.env_keys, *config_keys(config)])
        self.version = config.version()
        self.on_change(keys, self.version, ModelRoutes(config.models), config.upstreams)
        log.info(
            "configuration loaded",
            extra={
                "event": "config_reload",
                "ok": True,
                "source": source,
                "version": self.version,
                "keys": len(config.keys),
                "policies": len(config.policies),
            },
        )

    def _stat(self) -> tuple[int, ...]:
        assert self.path is not None
        st = os.stat(self.path)
        return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def env_policy(
    requests_per_minute: int | None,
    tokens_per_minute: int | None,
    tokens_per_day: int | None,
    max_concurrent_requests: int | None,
) -> Policy | None:
    """The policy of `GATEWAY_API_KEYS` keys, from `GATEWAY_DEFAULT_*`; None: unlimited."""
    limits = (requests_per_minute, tokens_per_minute, tokens_per_day, max_concurrent_requests)
    if all(limit is None for limit in limits):
        return None
    return Policy(
        requests_per_minute=requests_per_minute,
        tokens_per_minute=tokens_per_minute,
        tokens_per_day=tokens_per_day,
        max_concurrent_requests=max_concurrent_requests,
    )
