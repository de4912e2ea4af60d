"""The configuration document, watched through the Kubernetes API.

A mounted Secret reaches the pod's files only at the kubelet's next sync (a minute or
more), too slow for revoking a key. With `GATEWAY_CONFIG_SECRET=<namespace>/<name>` the
gateway also reads its config Secret through the API and keeps a watch on it, so a change
applies within a second or two of the operator writing it; the mounted file stays the
fallback (and the only source outside Kubernetes). Both feed the same `ConfigWatcher`, so
validation, "last good document wins" and the reload metrics are the same.

The pod's service account needs `get` and `watch` on that one Secret (the operator creates
the Role). In-cluster, the API address, token and CA come from the usual places;
`GATEWAY_KUBE_API_URL` (and the token/CA file variables) point elsewhere. A lost watch is
resumed from the last resourceVersion; on any error the watcher backs off and re-reads.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from tollgate_gateway.config_watch import ConfigWatcher

log = logging.getLogger("tollgate.config")

DATA_KEY = "config.json"
_SA = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class SecretWatcher:
    def __init__(
        self,
        secret: str,
        config: ConfigWatcher,
        api_url: str | None = None,
        token_file: str | None = None,
        ca_file: str | None = None,
    ) -> None:
        self.namespace, _, self.name = secret.partition("/")
        self.config = config
        host, port = (
            os.environ.get("KUBERNETES_SERVICE_HOST"),
            os.environ.get("KUBERNETES_SERVICE_PORT", "443"),
        )
        self.api_url = (api_url or (f"https://{host}:{port}" if host else "")).rstrip("/")
        self.token_file = Path(token_file) if token_file else _SA / "token"
        self.ca_file = Path(ca_file) if ca_file else _SA / "ca.crt"
        self._session: aiohttp.ClientSession | None = None
        self._version = ""

    async def start(self) -> None:
        """Read the Secret once (so a fresh pod starts on the newest document), then keep
        watching in the background."""
        if not self.api_url:
            log.warning(
                "GATEWAY_CONFIG_SECRET set but no Kubernetes API address; using the file only",
                extra={"event": "config_secret", "ok": False},
            )
            return
        ssl_context: ssl.SSLContext | bool = False
        if self.api_url.startswith("https") and self.ca_file.exists():
            ssl_context = ssl.create_default_context(cafile=str(self.ca_file))
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl_context),
            timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_read=330),
        )
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            await self._read()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def watch(self) -> None:
        if self._session is None:
            return
        delay = 1.0
        while True:
            try:
                if not self._version:
                    await self._read()
                await self._watch_once()
                delay = 1.0
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
                log.warning(
                    "config Secret watch interrupted; retrying",
                    extra={"event": "config_secret", "ok": False, "error": repr(exc)},
                )
                self._version = ""
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    def _headers(self) -> dict[str, str]:
        try:
            return {"authorization": "Bearer " + self.token_file.read_text().strip()}
        except OSError:
            return {}

    async def _read(self) -> None:
        assert self._session is not None
        url = f"{self.api_url}/api/v1/namespaces/{self.namespace}/secrets/{self.name}"
        async with self._session.get(url, headers=self._headers()) as resp:
            resp.raise_for_status()
            secret = await resp.json()
        self._version = secret["metadata"].get("resourceVersion", "")
        self._apply(secret)

    async def _watch_once(self) -> None:
        assert self._session is not None
        url = (
            f"{self.api_url}/api/v1/namespaces/{self.namespace}/secrets"
            f"?watch=true&fieldSelector={quote('metadata.name=' + self.name)}"
            f"&resourceVersion={self._version}&allowWatchBookmarks=true&timeoutSeconds=300"
        )
        async with self._session.get(url, headers=self._headers()) as resp:
            resp.raise_for_status()
            async for line in resp.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":  # e.g. 410 Gone: the version is too old; re-read
                    self._version = ""
                    return
                metadata = obj.get("metadata") or {}
                self._version = metadata.get("resourceVersion", self._version)
                if kind in ("ADDED", "MODIFIED") and metadata.get("name") == self.name:
                    self._apply(obj)

    def _apply(self, secret: dict[str, Any]) -> None:
        raw = (secret.get("data") or {}).get(DATA_KEY)
        if raw is None:
            return
        self.config.apply_bytes(base64.b64decode(raw), source="secret")
