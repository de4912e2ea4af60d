"""The configuration document on disk: loaded at start, reloaded when it changes.

The file is polled with `os.stat` (inode, size, mtime) every `poll_interval` seconds.
Polling follows symlinks, so it sees the way Kubernetes updates a mounted Secret (the
`..data` symlink is swapped to a new directory; the file's inode changes) as well as an
editor's in-place write, with no inotify edge cases. A reload builds a new `KeyRing` and
hands it over in one assignment: in-flight requests keep the key object they have. An
invalid document is logged, counted, and ignored; the last good one stays.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from tollgate_contract.config import GatewayConfig, Policy, parse
from tollgate_gateway.keys import ApiKey, KeyRing, config_keys

log = logging.getLogger("tollgate.config")


class ConfigError(Exception):
    pass


class ConfigWatcher:
    def __init__(
        self,
        path: str | None,
        env_keys: list[ApiKey],
        on_change: Callable[[KeyRing, str], None],
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

    def load(self) -> None:
        """The first load: a broken document here stops the start (there is no last good)."""
        if self.path is None:
            self.on_change(KeyRing(self.env_keys), self.version)
            return
        try:
            self._signature = self._stat()
            config = parse(self.path.read_bytes())
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
        assert self.path is not None
        try:
            signature = self._stat()
        except OSError:
            signature = None
        if signature == self._signature:
            return
        self._signature = signature
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            self._rejected(exc, "file")
            return
        self.apply_bytes(raw, source="file")

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
        self.on_change(keys, self.version)
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
