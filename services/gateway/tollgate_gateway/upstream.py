"""The upstream replicas: one shared HTTP client, each replica's health and breaker, and
the choice of a replica for each request.

Requests go upstream through `h1client`, the project's own keep-alive HTTP/1.1 client on
asyncio protocols: measured against aiohttp in the same run it spends 0.20-0.33 of
aiohttp's CPU per request (bench/client_bench.py), and aiohttp was itself an eighth of
httpx's (docs/performance.md); the upstream client is most of a Python proxy's cost. One
pool per replica, created at first use and shared by every request. Idle connections are
dropped after `KEEPALIVE_SECONDS`, less than uvicorn's (and so vLLM's) 5 s keep-alive
timeout, and a request that meets a connection the upstream closed as it was written is
sent once more on a new one. The health and model-list polls have a client of their own
(two connections a replica), so a replica whose request connections are all busy is
still asked.

Replicas come from `VLLM_URL` (one), `VLLM_URLS` (a list), or `VLLM_DNS_NAME` (a headless
Service's name, re-resolved every `VLLM_DNS_REFRESH_SECONDS`: replicas join and leave
without a restart). Each has its own `/health` poll and circuit breaker, and serves the
models it lists at `/v1/models` (or those configured for it).

Each request to a replica is an `Attempt`: it counts the replica's requests in flight from
the moment it starts, and its `finish(outcome)` is the one place where the outcome of a
request becomes the replica's accounting, its breaker's verdict, and the fate of the
keep-alive connection. The proxy only says what happened (`Outcome`); the HTTP clients'
types and exceptions stay in this module.

Choosing a replica: least outstanding requests by "power of two choices" — two random
candidates among the healthy, closed-breaker replicas serving the request's model, the one
with fewer requests in flight wins — so a replica stuck on long generations gets fewer new
requests, at O(1) per request. With session affinity, a rendezvous hash of the session (a
header or the key's name) picks the same replica while it is available.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import json
import logging
import random
import socket
from collections.abc import Awaitable, Callable, Iterable
from time import monotonic, perf_counter
from typing import NamedTuple

from tollgate_contract.config import replica_url
from tollgate_gateway import errors, h1client
from tollgate_gateway.breaker import CircuitBreaker, State
from tollgate_gateway.errors import Refusal
from tollgate_gateway.routing import (
    ReplicaLoad,
    Scorer,
    Weights,
    parse_load,
    prefix_blocks,
    uncached,
)
from tollgate_gateway.settings import Settings

log = logging.getLogger("tollgate.upstream")
HEALTH_TIMEOUT_SECONDS = 2.0

KEEPALIVE_SECONDS = 4.0
# The URLs the health poll uses, built once per replica (requests go through h1client,
# which takes a request target).


class Limits(NamedTuple):
    """An attempt's timeouts."""

    # TCP connect (and TLS handshake) only: never the wait for a pooled connection, which
    # is the gateway's own queue, not the replica's failure.
    connect: float | None
    # The first response byte, then each gap between reads.
    read: float | None


class Outcome(enum.Enum):
    """How one attempt ended, as the replica's breaker and connection pool see it."""

    # The answer was read to its end (any status below 500).
    SUCCEEDED = "succeeded"
    # The client left (or the gateway cut the request): says nothing about the replica.
    ABANDONED = "abandoned"
    # Failures of the replica; each value is the upstream error metric's `kind`.
    UNREACHABLE = "unreachable"
    ERROR = "error"
    TIMEOUT = "timeout"
    STATUS_5XX = "status_5xx"
    STREAM_BROKEN = "stream_broken"

    @property
    def is_failure(self) -> bool:
        return self not in (Outcome.SUCCEEDED, Outcome.ABANDONED)


class UpstreamFailure(Exception):
    """An attempt failed; `retryable` when the replica cannot have started on it."""

    def __init__(self, outcome: Outcome, detail: str, retryable: bool = False) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.retryable = retryable


def _failure(exc: h1client.H1Error, while_streaming: bool = False) -> UpstreamFailure:
    detail = f"{type(exc).__name__}: {exc}"
    if while_streaming:
        return UpstreamFailure(Outcome.STREAM_BROKEN, detail)
    if isinstance(exc, TimeoutError):  # ConnectTimeout, ReadTimeout
        return UpstreamFailure(Outcome.TIMEOUT, detail)
    if isinstance(exc, h1client.ConnectError):
        return UpstreamFailure(Outcome.UNREACHABLE, detail, retryable=True)
    retryable = isinstance(exc, h1client.ServerDisconnected)
    return UpstreamFailure(Outcome.ERROR, detail, retryable=retryable)


Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve(host: str, port: int) -> list[str]:
    """The A and AAAA records of `host`, through the system resolver."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


class Upstream:
    """One replica."""

    def __init__(self, base: str, breaker: CircuitBreaker, models: Iterable[str] | None) -> None:
        self.base = base
        self.name = base.split("://", 1)[-1]  # host:port, the metrics label
        self.breaker = breaker
        self.healthy = False
        self.inflight = 0
        self.requests = 0
        # Its vLLM /metrics at the last scrape (GATEWAY_ROUTING=vllm), and this gateway's
        # requests in flight to it then.
        self.load: ReplicaLoad | None = None
        self.inflight_at_load = 0
        # Bytes of prompt this gateway sent it to compute that have no answer byte yet
        # (the scorer's prefill term; GATEWAY_ROUTING=vllm only).
        self.prefilling = 0
        # None: not known yet (the replica is tried for any model).
        self.models: frozenset[str] | None = frozenset(models) if models is not None else None
        self.configured_models = models is not None

    def available(self) -> bool:
        return self.healthy and self.breaker.state is not State.OPEN

    def serves(self, model: str | None) -> bool:
        return model is None or self.models is None or model in self.models


class Attempt:
    """One request to one replica, from sending it to `finish`."""

    __slots__ = ("_finished", "_pool", "_prefill", "_response", "upstream", "waited")

    def __init__(self, upstream: Upstream, pool: h1client.Pool, prefill: int = 0) -> None:
        self.upstream = upstream
        self._pool = pool
        self._response: h1client.Response | None = None
        self._finished = False
        # Seconds spent waiting on the replica (its headers, body and stream reads).
        self.waited = 0.0
        upstream.inflight += 1
        upstream.requests += 1
        # Its prompt bytes the replica computes, counted until the first answer byte.
        self._prefill = prefill
        upstream.prefilling += prefill

    def answered(self) -> None:
        """The first answer byte (or the end): the replica is past this prefill."""
        if self._prefill:
            self.upstream.prefilling -= self._prefill
            self._prefill = 0

    async def send(
        self, method: str, target: str, body: bytes, headers: dict[str, str], limits: Limits
    ) -> tuple[int, str]:
        """Send the request; the response's status and content type (headers read)."""
        started = perf_counter()
        pool = self._pool
        try:
            length = len(body) if body or method != "GET" else None
            response = await pool.request(
                pool.head(method, target, headers, length),
                body,
                connect_timeout=limits.connect,
                read_timeout=limits.read,
            )
        except h1client.H1Error as exc:
            raise _failure(exc) from None
        finally:
            self.waited += perf_counter() - started
        self._response = response
        return response.status, response.content_type or "application/json"

    async def read(self) -> bytes:
        """The whole body."""
        assert self._response is not None
        started = perf_counter()
        try:
            return await self._response.read()
        except h1client.H1Error as exc:
            raise _failure(exc) from None
        finally:
            self.waited += perf_counter() - started
            self.answered()

    async def pump(self, sink: Callable[[bytes], bool]) -> bool:
        """The body to `sink` as it arrives (`h1client.Response.pump`): True at its end,
        False when `sink` had no room; a failure mid-way is `STREAM_BROKEN`. The time
        inside counts as waiting on the replica, the sink's own included: the caller
        takes that back out (it is the gateway's)."""
        assert self._response is not None
        started = perf_counter()
        try:
            return await self._response.pump(sink)
        except h1client.H1Error as exc:
            raise _failure(exc, while_streaming=True) from None
        finally:
            self.waited += perf_counter() - started

    def finish(self, outcome: Outcome) -> None:
        """The attempt's end: replica accounting, breaker verdict and connection reuse,
        decided here and only here. Idempotent."""
        if self._finished:
            return
        self._finished = True
        self.upstream.inflight -= 1
        self.answered()
        breaker = self.upstream.breaker
        if outcome is Outcome.SUCCEEDED:
            breaker.success()
        elif outcome is Outcome.ABANDONED:
            breaker.release()
        else:
            breaker.failure()
        if self._response is not None:
            # A body read to its end leaves a reusable connection (release() reuses it only
            # then, and only if the server keeps it alive); anything else closes it.
            if outcome in (Outcome.SUCCEEDED, Outcome.STATUS_5XX):
                self._response.release()
            else:
                self._response.close()


class UpstreamPool:
    def __init__(
        self,
        settings: Settings,
        on_models: Callable[[], None] = lambda: None,
        resolver: Resolver = resolve,
    ) -> None:
        self.settings = settings
        self.authorization = f"Bearer {settings.vllm_api_key}" if settings.vllm_api_key else None
        connect = settings.upstream_connect_timeout_seconds
        self.timeout_full = Limits(connect, settings.upstream_first_byte_timeout_seconds)
        self.timeout_stream = Limits(connect, settings.upstream_stream_idle_timeout_seconds)
        self.client = h1client.Client(
            limit=settings.upstream_max_connections, keepalive=KEEPALIVE_SECONDS
        )
        self._health_interval = settings.upstream_health_interval_seconds
        # A poll's answer may take this long whatever the interval (polls never overlap:
        # the next waits for this one). A timeout as short as a fast interval marked
        # replicas of a busy machine down, and moved their sessions.
        self._health_timeout = HEALTH_TIMEOUT_SECONDS
        self._scrape_interval = settings.gateway_routing_scrape_seconds
        self._cap = settings.gateway_upstream_max_in_flight
        self.scorer = (
            Scorer(
                Weights.parse(settings.gateway_routing_weights),
                stale_after=max(1.0, 4 * self._scrape_interval),
            )
            if settings.gateway_routing == "vllm"
            else None
        )
        self._health_client = h1client.Client(limit=2, keepalive=KEEPALIVE_SECONDS)
        # The body the scorer last ranked for, and its prefix blocks (for attempt()).
        self._picked: tuple[bytes, list[int]] = (b"", [])
        self._on_models = on_models
        self._resolver = resolver
        self.upstreams: list[Upstream] = []
        self.dns_refreshes = {"ok": 0, "failed": 0}
        self.retries = 0
        self._tasks: list[asyncio.Task[None]] = []
        configured = settings.vllm_upstream_models
        for base in settings.upstream_bases:
            self.upstreams.append(self._new(base, configured.get(base)))

    def _new(self, base: str, models: Iterable[str] | None) -> Upstream:
        breaker = CircuitBreaker(
            self.settings.breaker_failure_threshold,
            self.settings.breaker_open_seconds,
            name=base.split("://", 1)[-1],
        )
        return Upstream(base, breaker, models)

    # Lifecycle

    async def start(self) -> None:
        if self.settings.vllm_dns_name:
            await self.refresh_dns()
            self._tasks.append(asyncio.create_task(self._refresh_dns_forever(), name="dns"))
        await self.check_health()
        self._tasks.append(asyncio.create_task(self._poll_health(), name="upstream-health"))
        if self.scorer is not None:
            self._tasks.append(asyncio.create_task(self._poll_load(), name="upstream-load"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._health_client.close()
        await self.client.close()

    def attempt(self, upstream: Upstream, body: bytes = b"") -> Attempt:
        """The request (`body`) is sent to `upstream` (picked just before, with no await
        in between): with the vLLM-aware scorer, its prefix is there from now on, and the
        bytes the replica must compute count as its prefill work until it answers."""
        scorer = self.scorer
        prefill = 0
        if scorer is not None and body:
            picked, blocks = self._picked
            if picked is not body:  # not the body the last pick hashed
                blocks = prefix_blocks(body)
            prefill = uncached(len(body), scorer.depth(upstream.base, blocks))
            scorer.chosen(upstream, blocks)
        self._picked = (b"", [])
        return Attempt(upstream, self.client.pool(upstream.base), prefill)

    def _open(self, u: Upstream) -> bool:
        """Below this gateway's limit of requests in flight there (if it has one)."""
        return self._cap is None or u.inflight < self._cap

    def has_room(self, model: str | None, pending: int) -> bool:
        """Whether the replicas serving `model` have a place for one more request beyond
        `pending` ones on their way (the fair queue's question). With none available
        (breakers open, none healthy) there is nothing to wait for: yes, and the request's
        route refuses it at once, as without the queue."""
        cap = self._cap
        if cap is None:
            return True
        usable = [u for u in self.upstreams if u.available() and u.serves(model)]
        return not usable or sum(max(0, cap - u.inflight) for u in usable) > pending

    def places(self) -> int:
        """Every place on the available replicas (0 without a limit): the fair queue's
        total for the keys' shares."""
        cap = self._cap
        return 0 if cap is None else cap * sum(u.available() for u in self.upstreams)

    # Choosing a replica

    def pick(
        self,
        model: str | None,
        affinity: str | None = None,
        exclude: Upstream | None = None,
        body: bytes = b"",
    ) -> Upstream | None:
        """A replica for a request, or None if no available replica serves `model`.
        `body`: the request's, whose prefix the vLLM-aware scorer matches."""
        upstreams = self.upstreams
        if not upstreams:  # DNS discovery before its first answer
            return None
        if len(upstreams) == 1:  # the common single-URL case: no sampling
            only = upstreams[0]
            if only is not exclude and only.available() and only.serves(model) and self._open(only):
                return only if only.breaker.allow() else None
            return None
        if affinity is not None:
            return self._pick_affine(model, affinity, exclude)
        if self.scorer is not None:
            return self._pick_scored(self.scorer, model, exclude, body)
        # Two random choices first (O(1)); a full scan only if they were not usable.
        a, b = random.sample(upstreams, 2)
        usable_a = a is not exclude and a.available() and a.serves(model) and self._open(a)
        usable_b = b is not exclude and b.available() and b.serves(model) and self._open(b)
        if usable_a and usable_b:
            first, second = (a, b) if a.inflight <= b.inflight else (b, a)
            if first.breaker.allow():
                return first
            if second.breaker.allow():
                return second
        candidates = [u for u in upstreams if self._usable(u, model, exclude)]
        candidates.sort(key=lambda u: (u.inflight, random.random()))
        for upstream in candidates:
            if upstream.breaker.allow():
                return upstream
        return None

    def _usable(self, u: Upstream, model: str | None, exclude: Upstream | None) -> bool:
        return u is not exclude and u.available() and u.serves(model) and self._open(u)

    def _pick_scored(
        self, scorer: Scorer, model: str | None, exclude: Upstream | None, body: bytes
    ) -> Upstream | None:
        candidates = [u for u in self.upstreams if self._usable(u, model, exclude)]
        blocks = prefix_blocks(body)
        self._picked = (body, blocks)  # attempt() records them where the request goes
        for upstream in scorer.rank(candidates, blocks, model, len(body)):
            if upstream.breaker.allow():
                return upstream
        return None

    def _pick_affine(
        self, model: str | None, affinity: str, exclude: Upstream | None
    ) -> Upstream | None:
        """Rendezvous hashing: the same session lands on the same replica while it is
        available; when it is not, only its sessions move."""
        ranked = sorted(
            (u for u in self.upstreams if self._usable(u, model, exclude)),
            key=lambda u: hashlib.blake2b(f"{affinity}|{u.base}".encode(), digest_size=8).digest(),
            reverse=True,
        )
        for upstream in ranked:
            if upstream.breaker.allow():
                return upstream
        return None

    def knows_model(self, model: str | None) -> bool:
        """False only when every replica's model list is known and none has `model`."""
        return any(u.serves(model) for u in self.upstreams)

    def refusal_for(self, model: str | None) -> Refusal:
        """Why no replica can take a request for `model` now."""
        if self.upstreams and not self.knows_model(model):
            return Refusal(
                errors.MODEL_NOT_FOUND,
                f"The model `{model}` does not exist.",
                reason="unknown_model",
                param="model",
            )
        if any(u.healthy and u.serves(model) for u in self.upstreams):
            return Refusal(
                errors.UNAVAILABLE,
                "The upstream is failing; the gateway's circuit breaker is open.",
                self.retry_after(model),
                reason="breaker",
            )
        return Refusal(
            errors.NO_UPSTREAM,
            "No healthy upstream serves this model right now.",
            1,
            reason="no_upstream",
        )

    def retry_after(self, model: str | None = None) -> float:
        """When the first open breaker of a healthy replica serving `model` lets a probe
        through (an unhealthy replica's closed breaker says nothing about that)."""
        open_ones = [
            u.breaker.retry_after()
            for u in self.upstreams
            if u.healthy and u.serves(model) and u.breaker.state is State.OPEN
        ]
        return min(open_ones, default=1.0)

    def models(self) -> set[str]:
        return {m for u in self.upstreams if u.models for m in u.models}

    def problems(self) -> list[str]:
        """What keeps requests from being served now (reported by `/ready`, which does
        not fail on them: a gateway that answers 503 with a reason beats a Service with no
        endpoints, and a vLLM outage must not block node drains)."""
        available = [u for u in self.upstreams if u.available()]
        if not available:
            if not self.upstreams:
                return ["no upstream replicas known"]
            return [
                f"upstream {u.name}: " + ("circuit breaker open" if u.healthy else "unhealthy")
                for u in self.upstreams
            ]
        missing = [m for m in sorted(self.models()) if not any(u.serves(m) for u in available)]
        return [f"no available upstream serves {m}" for m in missing]

    # Health

    async def check_health(self) -> None:
        await asyncio.gather(*(self._check(u) for u in list(self.upstreams)))

    async def _get(self, upstream: Upstream, path: str) -> tuple[int, bytes]:
        """A poll's GET: status and body, within the health timeout."""
        pool = self._health_client.pool(upstream.base)
        headers = {"authorization": self.authorization} if self.authorization else {}
        async with asyncio.timeout(self._health_timeout):
            response = await pool.request(pool.head("GET", path, headers, None))
            try:
                return response.status, await response.read()
            finally:
                response.release()

    async def _check(self, upstream: Upstream) -> None:
        try:
            status, _ = await self._get(upstream, "/health")
            healthy = status == 200
        except (h1client.H1Error, OSError, TimeoutError):
            healthy = False
        if healthy and (not upstream.healthy or upstream.models is None):
            await self._read_models(upstream)
        if healthy != upstream.healthy:
            log.log(
                logging.INFO if healthy else logging.WARNING,
                "upstream %s %s",
                upstream.name,
                "healthy" if healthy else "unhealthy",
                extra={"event": "upstream_health", "healthy": healthy, "upstream": upstream.name},
            )
        upstream.healthy = healthy

    async def _read_models(self, upstream: Upstream) -> None:
        if upstream.configured_models:
            return
        try:
            status, body = await self._get(upstream, "/v1/models")
            if status != 200:
                return
            listed = json.loads(body)["data"]
            models = frozenset(m["id"] for m in listed if isinstance(m.get("id"), str))
        except (h1client.H1Error, OSError, TimeoutError, ValueError, KeyError, TypeError,
                AttributeError):  # fmt: skip
            return
        if models != upstream.models:
            upstream.models = models
            self._on_models()

    async def _poll_load(self) -> None:
        """Each replica's vLLM /metrics, for the scorer; a failed read leaves the last,
        which ages out (the scorer then counts only this gateway's requests)."""
        while True:
            await asyncio.sleep(self._scrape_interval)
            await asyncio.gather(*(self._read_load(u) for u in list(self.upstreams)))

    async def _read_load(self, upstream: Upstream) -> None:
        if not upstream.healthy:
            return
        inflight = upstream.inflight
        try:
            status, body = await self._get(upstream, "/metrics")
        except (h1client.H1Error, OSError, TimeoutError):
            return
        if status == 200:
            upstream.load = parse_load(body, monotonic())
            upstream.inflight_at_load = inflight

    async def _poll_health(self) -> None:
        while True:
            await asyncio.sleep(self._health_interval)
            await self.check_health()

    # DNS discovery

    async def refresh_dns(self) -> None:
        name = self.settings.vllm_dns_name
        assert name is not None
        host, _, port_text = name.rpartition(":")
        port = int(port_text)
        try:
            addresses = await self._resolver(host, port)
        except OSError as exc:
            self.dns_refreshes["failed"] += 1
            log.warning(
                "upstream DNS lookup failed; keeping the known replicas",
                extra={"event": "upstream_dns", "name": name, "error": repr(exc)},
            )
            return
        self.dns_refreshes["ok"] += 1
        if not addresses:
            return  # an empty answer is more likely a glitch than a scale-to-zero
        joined = self._replace(
            [url for a in addresses if (url := replica_url(a, port)) is not None], "dns"
        )
        await asyncio.gather(*(self._check(u) for u in joined))
        if joined:
            self._on_models()

    def use_bases(self, bases: list[str], source: str) -> None:
        """The replicas as the configuration document names them (the operator's view of
        an InferencePool); those that joined are checked at once, not at the next poll."""
        joined = self._replace(bases, source)
        if joined and self._tasks:  # started: check them now (else start() checks all)
            self._tasks.append(
                asyncio.create_task(self._check_joined(joined), name="upstream-joined")
            )

    async def _check_joined(self, joined: list[Upstream]) -> None:
        await asyncio.gather(*(self._check(u) for u in joined))
        self._on_models()

    def _replace(self, bases: list[str], source: str) -> list[Upstream]:
        """Swap the list of replicas; the ones that joined. In-flight requests keep their
        Upstream object; new requests see the new list."""
        current = {u.base: u for u in self.upstreams}
        if set(bases) == set(current):
            return []
        joined = [b for b in bases if b not in current]
        left = [b for b in current if b not in bases]
        self.upstreams = [current.get(b) or self._new(b, None) for b in dict.fromkeys(bases)]
        log.info(
            "upstream replicas changed",
            extra={"event": "upstream_replicas", "source": source, "joined": joined, "left": left},
        )
        return [u for u in self.upstreams if u.base in joined]

    async def _refresh_dns_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.vllm_dns_refresh_seconds)
            await self.refresh_dns()
