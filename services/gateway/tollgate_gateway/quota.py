"""Per-key limits that hold across replicas: admission, settlement, and the flush timer.

Every replica keeps three kinds of numbers per key:

- global totals, as the store returned them at the last flush (all replicas' usage);
- local deltas not yet flushed (this replica's usage since);
- reservations of its in-flight requests.

Admission compares global + local + reserved with the key's policy, in memory; the store is
never on the request path. A request reserves its prompt estimate plus its `max_tokens` (or
a default) at admission, so concurrent long streams cannot all start on the same remaining
quota; at its end the reservation is released and the real usage recorded.

Windows: tokens per day are counted per UTC day (a request counts on the day it ends; the
quota resets at 00:00 UTC). Requests and tokens per minute use a sliding window estimated
from two fixed one-minute windows (the previous one weighted by how much of it still
overlaps the last 60 s). Concurrent requests are counted per replica.

Over-admission bound: a replica sees other replicas' usage at most one flush interval
late, so past a limit at most (replicas - 1) x flush interval x the key's traffic rate can
be admitted, plus what the last admitted requests use beyond their reservation. A store
outage stops the sharing: replicas then admit on their last known totals (fail-open, the
default) or refuse with 503 (`QUOTA_FAIL_CLOSED=true`); deltas stay buffered and are all
flushed when the store returns. A killed process (SIGKILL) loses at most one flush
interval of usage; SIGTERM flushes everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from tollgate_gateway import errors
from tollgate_gateway.errors import ErrorKind
from tollgate_gateway.keys import ApiKey
from tollgate_gateway.stores import Batch, Counts, DayWindow, MinuteWindow, QuotaStore
from tollgate_gateway.usage import Usage

log = logging.getLogger("tollgate.quota")

# A key whose last request is older than this is no longer refreshed at every flush.
ACTIVE_SECONDS = 600.0
_EMPTY = Counts()


@dataclass(slots=True)
class Admission:
    key: str
    reserved: int


@dataclass(slots=True)
class Refusal:
    kind: ErrorKind
    message: str
    retry_after: int
    reason: str  # the metrics' rejection reason


class QuotaLedger:
    def __init__(
        self,
        store: QuotaStore,
        flush_interval: float,
        fail_closed: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.flush_interval = flush_interval
        self.fail_closed = fail_closed
        self._clock = clock
        self.replica_id = uuid.uuid4().hex
        self._seq = 0
        self._global_days: dict[DayWindow, Counts] = {}
        self._global_minutes: dict[MinuteWindow, Counts] = {}
        self._pending = Batch(self.replica_id, 0)
        self._sending: Batch | None = None
        self._reserved: dict[str, int] = {}
        self._inflight: dict[str, int] = {}
        self._active: dict[str, float] = {}
        self._flush_lock = asyncio.Lock()
        self._store_started = False
        self._task: asyncio.Task[None] | None = None
        self._day_number = -1
        self._day_text = ""
        self.store_ok = True
        self.flush_errors = 0
        self.last_flush_at = 0.0
        # Called with each successful flush's duration (the metrics histogram).
        self.on_flush: Callable[[float], None] = lambda seconds: None

    # Start and stop

    async def start(self, key_names: Iterable[str]) -> None:
        """Load today's totals of the known keys, then flush on a timer. A store that is
        down at start is an outage like any other: the gateway serves (or, fail-closed,
        refuses) and keeps trying to reach it at every flush."""
        now = self._clock()
        for name in key_names:
            self._active[name] = now
        await self.flush()
        self._task = asyncio.create_task(self._flush_forever(), name="quota-flush")

    async def close(self, deadline_seconds: float = 10.0) -> None:
        """Flush everything: SIGTERM must not lose usage. Retries until the deadline."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        deadline = time.monotonic() + deadline_seconds
        while not await self.flush() or self._has_deltas():
            if time.monotonic() > deadline:
                log.error(
                    "usage could not be flushed before exit",
                    extra={"event": "quota_lost", "unflushed": self._unflushed_summary()},
                )
                break
            await asyncio.sleep(0.2)
        await self.store.close()

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            await self.flush()

    # The request path

    def admit(self, key: ApiKey, reserve: int) -> Admission | Refusal:
        name = key.name
        now = self._clock()
        self._active[name] = now
        if self.fail_closed and not self.store_ok:
            return Refusal(
                errors.QUOTA_STORE_UNAVAILABLE,
                "The quota store is unavailable and this gateway fails closed.",
                max(1, round(self.flush_interval)),
                "quota_store",
            )
        day = self._day(now)
        minute = int(now // 60)
        reserved = self._reserved.get(name, 0)
        inflight = self._inflight.get(name, 0)
        policy = key.policy
        if policy is not None:
            limit = policy.max_concurrent_requests
            if limit is not None and inflight >= limit:
                return Refusal(
                    errors.RATE_LIMITED,
                    f"Too many concurrent requests for this key (limit {limit}).",
                    1,
                    "concurrency",
                )
            limit = policy.tokens_per_day
            if limit is not None and self._day_counts(name, day).tokens + reserved >= limit:
                return Refusal(
                    errors.QUOTA_EXCEEDED,
                    f"This key's daily quota of {limit} tokens is used up; it resets at 00:00 UTC.",
                    math.ceil(86400 - now % 86400),
                    "quota",
                )
            rpm, tpm = policy.requests_per_minute, policy.tokens_per_minute
            if rpm is not None or tpm is not None:
                frac = (now % 60) / 60
                cur = self._minute_counts(name, minute)
                prev = self._minute_counts(name, minute - 1)
                if rpm is not None:
                    wait = _sliding_wait(prev.requests, cur.requests + 1, rpm, frac)
                    if wait > 0:
                        return Refusal(
                            errors.RATE_LIMITED,
                            f"Rate limit reached: {rpm} requests per minute for this key.",
                            max(1, math.ceil(wait)),
                            "rate",
                        )
                if tpm is not None:
                    wait = _sliding_wait(prev.tokens, cur.tokens + reserved + 1, tpm, frac)
                    if wait > 0:
                        return Refusal(
                            errors.RATE_LIMITED,
                            f"Rate limit reached: {tpm} tokens per minute for this key.",
                            max(1, math.ceil(wait)),
                            "rate",
                        )
        self._reserved[name] = reserved + reserve
        self._inflight[name] = inflight + 1
        self._pending_day(name, day).requests += 1
        self._pending_minute(name, minute).requests += 1
        return Admission(name, reserve)

    def settle(self, admission: Admission, usage: Usage | None) -> None:
        """Release the reservation and record the real usage (none if the request failed)."""
        name = admission.key
        reserved = self._reserved[name] - admission.reserved
        inflight = self._inflight[name] - 1
        if inflight:
            self._reserved[name], self._inflight[name] = reserved, inflight
        else:
            del self._reserved[name], self._inflight[name]
        if usage is not None and usage.total_tokens:
            now = self._clock()
            day = self._pending_day(name, self._day(now))
            day.prompt_tokens += usage.prompt_tokens
            day.completion_tokens += usage.completion_tokens
            minute = self._pending_minute(name, int(now // 60))
            minute.prompt_tokens += usage.prompt_tokens
            minute.completion_tokens += usage.completion_tokens

    def today(self, name: str) -> tuple[str, Counts]:
        """A key's usage today as this replica knows it (global + not yet flushed)."""
        day = self._day(self._clock())
        return day, self._day_counts(name, day)

    # Flushing

    async def flush(self) -> bool:
        """Send local deltas, refresh global totals; False if the store failed."""
        async with self._flush_lock:
            if not self._store_started:
                try:
                    await self.store.start()
                except Exception as exc:
                    self._store_failed(exc)
                    return False
                self._store_started = True
            now = self._clock()
            active = [n for n, seen in self._active.items() if now - seen < ACTIVE_SECONDS]
            if self._sending is None:
                if not active and not self._has_deltas():
                    return True
                self._seq += 1
                self._pending.seq = self._seq
                self._sending, self._pending = self._pending, Batch(self.replica_id, 0)
            day, minute = self._day(now), int(now // 60)
            read_days = [(n, day) for n in active]
            read_minutes = [(n, m) for n in active for m in (minute - 1, minute)]
            started = time.perf_counter()
            try:
                totals = await self.store.flush(self._sending, read_days, read_minutes)
            except Exception as exc:
                self._store_failed(exc)
                return False
            self.on_flush(time.perf_counter() - started)
            self.last_flush_at = now
            self._global_days.update(totals.days)
            self._global_minutes.update(totals.minutes)
            self._sending = None
            if not self.store_ok:
                log.info(
                    "quota store back; buffered usage flushed",
                    extra={"event": "quota_store", "ok": True},
                )
            self.store_ok = True
            self._forget_old(now, day, minute)
            return True

    def _store_failed(self, exc: Exception) -> None:
        self.flush_errors += 1
        if self.store_ok:
            log.warning(
                "quota store unavailable; buffering usage",
                extra={"event": "quota_store", "ok": False, "error": repr(exc)},
            )
        self.store_ok = False

    def buffered_deltas(self) -> int:
        sending = self._sending
        pending = len(self._pending.days) + len(self._pending.minutes)
        return pending + (len(sending.days) + len(sending.minutes) if sending else 0)

    def _has_deltas(self) -> bool:
        return bool(self._pending.days or self._pending.minutes or self._sending)

    def _forget_old(self, now: float, day: str, minute: int) -> None:
        for name in [n for n, seen in self._active.items() if now - seen >= ACTIVE_SECONDS]:
            del self._active[name]
        self._global_days = {w: c for w, c in self._global_days.items() if w[1] == day}
        self._global_minutes = {w: c for w, c in self._global_minutes.items() if w[1] >= minute - 1}

    def _unflushed_summary(self) -> dict[str, int]:
        summary: dict[str, int] = {}
        for batch in (self._sending, self._pending):
            for (name, _), counts in (batch.days if batch else {}).items():
                summary[name] = summary.get(name, 0) + counts.tokens
        return summary

    # Counters

    def _day(self, now: float) -> str:
        number = int(now // 86400)
        if number != self._day_number:
            self._day_number = number
            self._day_text = time.strftime("%Y-%m-%d", time.gmtime(number * 86400))
        return self._day_text

    def _pending_day(self, name: str, day: str) -> Counts:
        counts = self._pending.days.get((name, day))
        if counts is None:
            counts = self._pending.days[(name, day)] = Counts()
        return counts

    def _pending_minute(self, name: str, minute: int) -> Counts:
        counts = self._pending.minutes.get((name, minute))
        if counts is None:
            counts = self._pending.minutes[(name, minute)] = Counts()
        return counts

    def _day_counts(self, name: str, day: str) -> Counts:
        return self._total((name, day), self._global_days, lambda batch: batch.days)

    def _minute_counts(self, name: str, minute: int) -> Counts:
        return self._total((name, minute), self._global_minutes, lambda batch: batch.minutes)

    def _total(
        self,
        window: Any,
        global_totals: dict[Any, Counts],
        of: Callable[[Batch], dict[Any, Counts]],
    ) -> Counts:
        """Global total + this replica's unflushed deltas (pending and being sent)."""
        total = Counts()
        total.add(global_totals.get(window, _EMPTY))
        total.add(of(self._pending).get(window, _EMPTY))
        if self._sending is not None:
            total.add(of(self._sending).get(window, _EMPTY))
        return total


def _sliding_wait(prev: float, cur: float, limit: float, frac: float) -> float:
    """Seconds until `prev * (1 - f) + cur <= limit`, `f` being how far into the current
    minute we are (now `frac`); 0 when it already holds."""
    if prev * (1 - frac) + cur <= limit:
        return 0.0
    if cur <= limit:
        # The previous minute's share decays linearly over this minute.
        f = 1 - (limit - cur) / prev
        return max(0.0, (f - frac) * 60)
    # This minute alone is over: wait until it has become the previous one and decayed.
    return (1 - frac) * 60 + (1 - limit / cur) * 60
