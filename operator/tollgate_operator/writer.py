"""One config writer per InferenceGateway: debounced, canonical, written only on change.

Events (an ApiKey created, a policy edited, a Secret generated) only *poke* the writer. It
waits for the burst to go quiet (`debounce`, at most `debounce_max` after the first poke),
rebuilds the whole document from the indexes, and compares its content hash with the one
last written (read back from the Secret's annotation after a restart). Same hash: no write.
So 100 ApiKeys applied at once become a handful of Secret writes, and an operator restart
against an unchanged cluster writes nothing.

Revocation bound (docs/operator.md): poke -> write is at most `debounce_max` plus one API
round trip; the gateway then sees the Secret through its watch.

A gateway whose upstream is an InferencePool gets the pool's ready pods as the document's
`upstreams`, read at each pass (the pool, and its pods by label selector): the pod and pool
watches only say *when* (handlers/inferencepool.py), so a pass never depends on a watch
cache being complete, and a restart against an unchanged pool writes nothing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import logging
from collections.abc import Iterable
from typing import Any

import kopf

from tollgate_contract.config import CONFIG_SECRET_KEY, GatewayConfig, parse

from . import children, metrics, pools
from .client import GATEWAYS, INFERENCE_POOLS, PODS, SECRETS, ApiError
from .configdoc import ApiKeyView, Built, GatewayView, PolicyView, Verdict, build, verdict
from .reconcile import ensure
from .runtime import Runtime
from .settings import SETTINGS
from .status import write_status

log = logging.getLogger(__name__)


class ConfigWriter:
    def __init__(
        self,
        runtime: Runtime,
        namespace: str,
        name: str,
        gateway_index: kopf.Index[Any, GatewayView],
        apikey_index: kopf.Index[Any, ApiKeyView],
        policy_index: kopf.Index[Any, PolicyView],
    ) -> None:
        self.runtime = runtime
        self.namespace = namespace
        self.name = name
        self._what = f"{namespace}/{name}"
        self._gateways = gateway_index
        self._apikeys = apikey_index
        self._policies = policy_index
        self._dirty = asyncio.Event()
        self._written = asyncio.Condition()
        self.version: str | None = None  # of the document in the Secret
        self.document: GatewayConfig | None = None
        self.verdicts: dict[str, Verdict] = {}
        self.synced = False  # verdicts describe the written document
        # The InferencePool as last resolved (None: the upstream is not a pool).
        self.resolution: pools.Resolution | None = None
        self.writes = 0
        runtime.gateway_index = gateway_index

    # ---- inputs from the indexes --------------------------------------------------------

    def gateway(self) -> GatewayView | None:
        for view in self._gateways.get((self.namespace, self.name), []):
            return view
        return None

    def api_keys(self) -> list[ApiKeyView]:
        return list(self._apikeys.get((self.namespace, self.name), []))

    def policies(self) -> dict[str, PolicyView]:
        return {p.name: p for p in self._policies.get(self.namespace, [])}

    def pool(self) -> str | None:
        gateway = self.gateway()
        return gateway.inference_pool if gateway is not None else None

    def verdict_for(self, key: ApiKeyView) -> Verdict:
        material = self.runtime.materials.get(key.uid)
        return verdict(key, self.gateway(), self.policies(), material, _now())

    # ---- the loop -----------------------------------------------------------------------

    def poke(self) -> None:
        self._dirty.set()
        metrics.set_pending("GatewayConfig", self._what, True)

    def observe(self, secret: dict[str, Any] | None) -> None:
        """The config Secret as a watch delivered it (None: deleted). Our own writes are
        recognised by their content and cost nothing; anything else (deleted, edited by
        hand) is rewritten from the document."""
        if secret is not None and _content_version(secret) == self.version:
            return
        self.version = None
        self.poke()

    async def run(self) -> None:
        """The daemon body: runs until kopf cancels it (gateway deleted, operator exit)."""
        self.poke()  # first pass at start: compare with what the Secret holds
        try:
            await self._loop()
        finally:
            metrics.set_pending("GatewayConfig", self._what, None)

    async def _loop(self) -> None:
        next_change: datetime.datetime | None = None
        while True:
            timeout = SETTINGS.resync_interval
            if next_change is not None:
                timeout = min(timeout, max(0.05, (next_change - _now()).total_seconds()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), timeout)
            await self._settle()
            try:
                with metrics.reconcile("GatewayConfig"):
                    built = await self.sync()
                next_change = built.next_change if built else None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("config for %s/%s not written: %s", self.namespace, self.name, exc)
                await asyncio.sleep(1.0)
                self._dirty.set()
                continue
            if not self._dirty.is_set():
                metrics.set_pending("GatewayConfig", self._what, False)

    async def _settle(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTINGS.debounce_max
        while True:
            self._dirty.clear()
            quiet = min(SETTINGS.debounce, deadline - loop.time())
            if quiet <= 0:
                return
            try:
                await asyncio.wait_for(self._dirty.wait(), quiet)
            except TimeoutError:
                return

    async def sync(self) -> Built | None:
        gateway = self.gateway()
        if gateway is None:
            return None
        keys = self.api_keys()
        for key in keys:
            if key.uid not in self.runtime.materials and not key.deleting:
                await self.runtime.load_material(key)
        if self.version is None:
            await self._read_back()
        resolution = await self._resolve_pool(gateway)
        upstreams = None if resolution is None else list(resolution.upstreams)
        materials = dict(self.runtime.materials)
        built = build(gateway, keys, self.policies(), materials, _now(), upstreams)
        version = built.config.version()
        if version != self.version:
            await self._write(gateway, built.config, version)
        changed = [
            n for n, v in built.verdicts.items() if not self.synced or self.verdicts.get(n) != v
        ]
        self.verdicts, self.synced = built.verdicts, True
        await self._patch_gateway_status(len(built.config.keys), version)
        if changed and self.runtime.key_status_hook is not None:
            await self.runtime.key_status_hook(self.namespace, changed)
        # Kept only once written: a failed pass reports (and retries) it again.
        before, self.resolution = self.resolution, resolution
        if self.resolution != before and self.runtime.gateway_status_hook is not None:
            await self.runtime.gateway_status_hook(self.namespace, self.name)
        return built

    async def _resolve_pool(self, gateway: GatewayView) -> pools.Resolution | None:
        """Where the document's `upstreams` come from: None (not there: the gateway's env
        decides) unless the upstream is an InferencePool; then its ready pods' URLs, none
        when it has no ready pod or is missing (the gateway answers 503: never traffic the
        pool does not name)."""
        name = gateway.inference_pool
        if name is None:
            return None
        client = self.runtime.client
        try:
            pool = await client.get(INFERENCE_POOLS, self.namespace, name)
            if pool is None:
                if not await client.served(INFERENCE_POOLS, SETTINGS.discovery_ttl):
                    return pools.not_served(name)
                return pools.missing(name)
            selector = dict(pools.PoolSpec.from_body(pool).selector)
            members = await client.select(PODS, self.namespace, selector) if selector else []
        except ApiError as exc:
            previous = (self.document.upstreams if self.document is not None else None) or []
            return pools.unreadable(name, exc.status, str(exc), previous)
        return pools.resolve(name, pool, members)

    async def _read_back(self) -> None:
        secret = await self.runtime.client.get(
            SECRETS, self.namespace, children.config_secret_name(self.name)
        )
        if secret is None:
            self.version, self.document = "", None
            return
        annotations = secret["metadata"].get("annotations") or {}
        raw = (secret.get("data") or {}).get(CONFIG_SECRET_KEY)
        try:
            self.document = parse(base64.b64decode(raw)) if raw else None
        except ValueError:
            self.document = None
        if self.document is not None:
            # Trust the content, not only the annotation: a hand-edited Secret is rewritten.
            actual = self.document.version()
            self.version = actual if annotations.get(children.VERSION_ANNOTATION) == actual else ""

    async def _write(self, gateway: GatewayView, config: GatewayConfig, version: str) -> None:
        owner = {"metadata": {"name": gateway.name, "namespace": gateway.namespace}}
        owner["metadata"]["uid"] = gateway.uid
        manifest = children.config_secret(owner, config.to_json(), version)
        await ensure(self.runtime.client, SECRETS, manifest, gateway.uid)
        self.writes += 1
        log.info(
            "config %s/%s: version %s, %d keys%s",
            self.namespace,
            children.config_secret_name(self.name),
            version,
            len(config.keys),
            "" if config.upstreams is None else f", {len(config.upstreams)} upstreams",
        )
        async with self._written:
            self.version, self.document = version, config
            self._written.notify_all()

    async def _patch_gateway_status(self, keys: int, version: str) -> None:
        wanted = {
            "keys": keys,
            "configVersion": version,
            "configSecret": children.config_secret_name(self.name),
        }
        await write_status(self.runtime, GATEWAYS, self.namespace, self.name, lambda _: wanted)

    # ---- revocation ---------------------------------------------------------------------

    def serves(self, names: Iterable[str]) -> bool:
        wanted = set(names)
        doc = self.document
        return doc is not None and any(k.name in wanted for k in doc.keys.values())

    async def wait_revoked(self, name: str, within: float) -> bool:
        """Until the written document no longer accepts key `name`."""
        self.poke()
        try:
            async with self._written:
                await asyncio.wait_for(
                    self._written.wait_for(lambda: not self.serves([name])), within
                )
            return True
        except TimeoutError:
            return False


def _content_version(secret: dict[str, Any]) -> str | None:
    raw = (secret.get("data") or {}).get(CONFIG_SECRET_KEY)
    try:
        return parse(base64.b64decode(raw)).version() if raw else None
    except ValueError:
        return None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
