"""Per-key limits that hold across replicas: admission, settlement, and the flush timer.

Every replica keeps three kinds of numbers per key:

- global totals, as the store returned them at the last flush (all replicas' usage);
- local deltas not yet flushed (this replica's usage since);
- reservations of its in-flight requests.

Admission compares global + local + reserved with the key's policy, in memory; the store is
never on the request path. Far from every limit even that comparison runs about once per
key and flush: it leaves the key a room (how far its counts may grow before it is near a
limit), which each admission and any usage beyond a reservation take from (`_Room`).

A request reserves its prompt estimate plus the most it may generate (`max_tokens`, or a
default, for each of its sequences) at admission, so concurrent long streams cannot all
start on the same remaining quota, and a request whose own generation cannot fit in what
is left of the key's tokens per day (or minute) is refused rather than run past the
limit; at its end the reservation is released and the real usage recorded.

Windows: tokens per day are counted per UTC day (a request counts on the day it ends; the
quota resets at 00:00 UTC). Requests and tokens per minute use a sliding window estimated
from two fixed one-minute windows (the previous one weighted by how much of it still
overlaps the last 60 s). Concurrent requests, and the tokens they reserved, are counted
per replica: its workers share them (`podshare.KeyCounts`).

Over-admission bound: a replica sees other replicas' usage at most one flush interval
late. Far from a limit that does not matter; within `exact_margin` of one (30 % by
default), and when replicas share the store, each admission is confirmed against the
store: its counts go there in one atomic flush that returns the global totals, and the
limits are checked again on those. "Near" counts the other replicas' unflushed share as
this replica's own times their number, so each comes near after about
limit * (1 - margin) / replicas of its own. The count is the store's, at each flush (one
every interval, idle or not): a replica that joined within the last interval is not yet in
the others' counts. A view older than two intervals (a flush queued at the store) counts
as near. So past a limit, what other replicas admit
unseen is what they admitted before they came near (at most that share each), what they
have in flight (their reservations are local), what races within one round trip to the
store, and what the admitted requests use beyond their reservation (a request without
`max_tokens` reserves `QUOTA_DEFAULT_RESERVE_TOKENS` a sequence). The workers of one pod
are replicas here (they share in-flight counts and reservations, `podshare.KeyCounts`). A store
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

from tollgate_contract.config import Policy
from tollgate_contract.usage import Usage
from tollgate_gateway import errors
from tollgate_gateway.errors import Refusal
from tollgate_gateway.keys import ApiKey
from tollgate_gateway.podshare import KeyCounts, pod_lock
from tollgate_gateway.stores import Batch, DayWindow, MinuteWindow, QuotaStore

log = logging.getLogger("tollgate.quota")

# A key whose last request is older than this is no longer refreshed at every flush.
ACTIVE_SECONDS = 600.0
_NONE: dict[Any, Usage] = {}


@dataclass(slots=True)
class _Room:
    """How far a key's counts may still grow before it comes within `exact_margin` of a
    limit, as its last full check found them (`QuotaLedger._check`): in tokens (which its
    reservations, times the replicas, and a request's own tokens take) and in requests.
    Every count a check reads only grows by what this ledger adds (until the next flush,
    which drops every room) or shrinks with time (the sliding minute decays, days end), so
    while the room lasts the full check would admit, and not call the key near."""

    policy: Policy
    tokens: float
    requests: float


@dataclass(slots=True)
class Admission:
    key: str
    reserved: int
    completion_tokens: int
    day: str
    minute: int
    # The key is near a limit and the store is shared: `QuotaLedger.confirm` decides.
    confirm: bool = False


class QuotaLedger:
    def __init__(
        self,
        store: QuotaStore,
        flush_interval: float,
        fail_closed: bool = False,
        clock: Callable[[], float] = time.time,
        exact_margin: float = 0.3,
        counts: KeyCounts | None = None,
        workers: int = 1,
    ) -> None:
        """`workers`: the processes of this replica's pod, each a ledger of its own: at
        least that many flush to the store, before it has said so."""
        self.store = store
        self.flush_interval = flush_interval
        self.fail_closed = fail_closed
        # Within this fraction of a limit, admissions are confirmed against the shared
        # store (0: never; the local view, at most a flush interval old, decides).
        self.exact_margin = exact_margin
        self._clock = clock
        self.replica_id = uuid.uuid4().hex
        self._seq = 0
        self._global_days: dict[DayWindow, Usage] = {}
        self._global_minutes: dict[MinuteWindow, Usage] = {}
        self._pending = Batch(self.replica_id, 0)
        self._sending: Batch | None = None
        # The last batch the store took (what another replica may be about to send).
        self._last_sent: Batch | None = None
        # Requests in flight and their reservations, per key, over the replica's workers.
        self._counts = counts or KeyCounts(pod_lock(1), 1)
        self._active: dict[str, float] = {}
        self._exact_until: dict[str, float] = {}
        self._rooms: dict[str, _Room] = {}
        self._flush_lock = asyncio.Lock()
        self._store_started = False
        self._task: asyncio.Task[None] | None = None
        self._day_number = -1
        self._day_text = ""
        self.store_ok = True
        # Ledgers flushing to the store, as it last said (for the near-limit estimate).
        self._workers = workers
        self.replicas = workers
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

    def admit(self, key: ApiKey, prompt_tokens: int, completion_tokens: int) -> Admission:
        """Admit a request that may use `prompt_tokens` + up to `completion_tokens`, and
        reserve both; else raise the `Refusal` that says which limit it hit. When the key
        is near a limit and replicas share the store, the admission must be confirmed
        against the store's own count (`confirm`) before the request goes on."""
        name = key.name
        now = self._clock()
        self._active[name] = now
        if self.fail_closed and not self.store_ok:
            raise Refusal(
                errors.QUOTA_STORE_UNAVAILABLE,
                "The quota store is unavailable and this gateway fails closed.",
                self.flush_interval,
                reason="quota_store",
            )
        day, minute = self._day(now), int(now // 60)
        reserve = prompt_tokens + completion_tokens
        limit = key.policy.max_concurrent_requests if key.policy is not None else None
        reserved = self._counts.enter(name, limit, reserve)
        if reserved is None and limit is None:
            raise Refusal(
                errors.OVERLOADED, "Too many keys in flight on this gateway.", 1, reason="overload"
            )
        if reserved is None:
            raise Refusal(
                errors.RATE_LIMITED,
                f"Too many concurrent requests for this key (limit {limit}).",
                1,
                reason="concurrency",
            )
        near = False
        tokens = max(1, completion_tokens)
        policy = key.policy
        if policy is not None:
            # The estimate of the others' unseen usage holds for a view at most an
            # interval old. An older one (this replica's flush queued at the store behind
            # the others' confirmations, at a few hundred requests a second) cannot tell
            # how near a limit the key is: it counts as near.
            stale = self.store.shared and now - self.last_flush_at > 2 * self.flush_interval
            held = self.replicas * reserved
            room = self._rooms.get(name)
            if (
                room is not None
                and room.policy is policy
                and room.requests >= 1
                and room.tokens >= held + tokens
                and not stale
            ):
                room.requests -= self.replicas  # this request, counted here and as a share
            else:
                try:
                    tokens_room, requests_room = self._check(
                        key, now, day, minute, 1, tokens, reserved
                    )
                except Refusal:
                    self._counts.leave(name, reserve)
                    raise
                near = stale or tokens_room < held + tokens or requests_room < 1
                if near or self._exact_until.get(name, 0.0) > now:
                    self._rooms.pop(name, None)
                else:
                    self._rooms[name] = _Room(policy, tokens_room, requests_room - self.replicas)
        # Once near a limit, a key stays on confirmed admissions for a minute: another
        # replica's unflushed admissions are exactly what the local view cannot see.
        if near:
            self._exact_until[name] = now + 60
        elif self._exact_until.get(name, 0.0) > now:
            near = True
        self._pending_day(name, day).requests += 1
        self._pending_minute(name, minute).requests += 1
        confirm = near and self.exact_margin > 0 and self.store.shared and self.store_ok
        return Admission(name, reserve, tokens, day, minute, confirm)

    async def confirm(self, key: ApiKey, admission: Admission) -> None:
        """Near a limit, the other replicas' latest usage decides: this replica's counts
        (this request included) go to the store in one atomic flush, which answers with
        the global totals, and the limits are checked again on those. Over-admission
        across replicas then shrinks from a flush interval's traffic to what is in flight
        and what races within one round trip to the store."""
        if not await self.flush():
            return  # the store is down: the local view decides (fail-open)
        try:
            reserved = self._counts.reserved(key.name)
            self._check(key, self._clock(), admission.day, admission.minute, 0, 0, reserved)
        except Refusal:
            # Not admitted after all: not a request (its reservation is released when the
            # request is settled, as every request's is).
            self._pending_day(admission.key, admission.day).requests -= 1
            self._pending_minute(admission.key, admission.minute).requests -= 1
            raise

    def _check(
        self,
        key: ApiKey,
        now: float,
        day: str,
        minute: int,
        requests: int,
        tokens: int,
        reserved: int,
    ) -> tuple[float, float]:
        """Raise the `Refusal` of the first limit that `requests` more requests and
        `tokens` more tokens (on top of what is counted, and `reserved` by the other
        requests in flight) would break; else the key's room before it comes within
        `exact_margin` of a limit, in tokens and in requests (`_Room`). The other replicas'
        in-flight reservations and unflushed usage are guessed from this replica's own
        (they see similar traffic), so its reservations, and what it counts since its last
        flush, weigh `replicas` times in the room."""
        policy = key.policy
        assert policy is not None
        name = key.name
        others = self.replicas - 1
        edge = 1 - self.exact_margin  # the fraction of a limit past which a key is near
        tokens_room = requests_room = math.inf
        limit = policy.tokens_per_day
        if limit is not None:
            prompt, completion, _ = self._counted((name, day), True)
            committed = prompt + completion + reserved
            if committed + tokens > limit:
                left = max(0, limit - committed)
                raise Refusal(
                    errors.QUOTA_EXCEEDED,
                    f"This key's daily quota of {limit} tokens is used up; it resets at 00:00 UTC."
                    if left == 0 or tokens == 0
                    else f"This request may generate up to {tokens} tokens"
                    f" (max_tokens for each of its sequences), more than the {left} left"
                    " of this key's daily quota; lower max_tokens or n.",
                    86400 - now % 86400,
                    reason="quota",
                )
            day_load = prompt + completion
            if others:
                prompt, completion, _ = self._share((name, day), True)
                day_load += others * (prompt + completion)
            tokens_room = limit * edge - day_load
        rpm, tpm = policy.requests_per_minute, policy.tokens_per_minute
        if rpm is None and tpm is None:
            return tokens_room, requests_room
        frac = (now % 60) / 60
        prompt, completion, cur_requests = self._counted((name, minute), False)
        cur_tokens = prompt + completion
        prompt, completion, prev_requests = self._counted((name, minute - 1), False)
        prev_tokens = prompt + completion
        unseen_requests = unseen_tokens = 0
        if others:
            prompt, completion, unseen_requests = self._share((name, minute), False)
            unseen_tokens = prompt + completion
        # The two sliding windows, alike: (limit, previous minute, this minute, this
        # request's own share, what the others' requests in flight hold, what the other
        # replicas may not have shown).
        windows = (
            (rpm, "requests", prev_requests, cur_requests, requests, 0, unseen_requests),
            (tpm, "tokens", prev_tokens, cur_tokens, tokens, reserved, unseen_tokens),
        )  # fmt: skip
        rooms: list[float] = []
        for limit, unit, previous, current, own, held, unseen in windows:
            if limit is None:
                rooms.append(math.inf)
                continue
            load = previous * (1 - frac) + current
            if load + held + own > limit:
                wait = _sliding_wait(previous, current + held + own, limit, frac, own)
                if wait > 0:
                    raise Refusal(
                        errors.RATE_LIMITED,
                        f"Rate limit reached: {limit} {unit} per minute for this key.",
                        wait,
                        reason="rate",
                    )
            rooms.append(limit * edge - load - others * unseen)
        return min(tokens_room, rooms[1]), rooms[0]

    def settle(self, admission: Admission, usage: Usage | None) -> None:
        """Release the reservation and record the real usage (none if the request failed)."""
        name = admission.key
        self._counts.leave(name, admission.reserved)
        if usage is not None and (usage.prompt_tokens or usage.completion_tokens):
            room = self._rooms.get(name)
            if room is not None:
                room.tokens -= self.replicas * (usage.prompt_tokens + usage.completion_tokens)
            now = self._clock()
            day = self._pending_day(name, self._day(now))
            day.prompt_tokens += usage.prompt_tokens
            day.completion_tokens += usage.completion_tokens
            minute = self._pending_minute(name, int(now // 60))
            minute.prompt_tokens += usage.prompt_tokens
            minute.completion_tokens += usage.completion_tokens

    def today(self, name: str) -> tuple[str, Usage]:
        """A key's usage today as this replica knows it (global + not yet flushed)."""
        day = self._day(self._clock())
        return day, Usage(*self._counted((name, day), True))

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
                # Idle, a shared store still hears from this replica at every interval:
                # the flush is its heartbeat, and its answer the count of replicas, which
                # must be current when a burst comes (each replica's share of a limit
                # before it confirms is limit / replicas; a stale count of one let every
                # replica admit nearly the whole limit alone).
                if not active and not self._has_deltas() and not self.store.shared:
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
            self.replicas = max(self._workers, totals.replicas)
            self._rooms.clear()  # the totals, the others' shares and their number moved
            self._last_sent, self._sending = self._sending, None
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
        self._exact_until = {n: t for n, t in self._exact_until.items() if t > now}
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

    def _pending_day(self, name: str, day: str) -> Usage:
        counts = self._pending.days.get((name, day))
        if counts is None:
            counts = self._pending.days[(name, day)] = Usage()
        return counts

    def _pending_minute(self, name: str, minute: int) -> Usage:
        counts = self._pending.minutes.get((name, minute))
        if counts is None:
            counts = self._pending.minutes[(name, minute)] = Usage()
        return counts

    def _counted(self, window: Any, days: bool, store: bool = True) -> tuple[int, int, int]:
        """(prompt tokens, completion tokens, requests) of a day's or a minute's `window`:
        this replica's deltas not yet in the store (pending and being sent) and, with
        `store`, the store's total at the last flush. Summed as numbers, not as `Usage`
        objects: this runs three times a request."""
        pending, sending = self._pending, self._sending
        tables: tuple[dict[Any, Usage], ...]
        if days:
            tables = (pending.days, sending.days if sending else _NONE, self._global_days)
        else:
            tables = (pending.minutes, sending.minutes if sending else _NONE, self._global_minutes)
        prompt = completion = requests = 0
        for table in tables if store else tables[:2]:
            counts = table.get(window)
            if counts is not None:
                prompt += counts.prompt_tokens
                completion += counts.completion_tokens
                requests += counts.requests
        return prompt, completion, requests

    def _share(self, window: Any, days: bool) -> tuple[int, int, int]:
        """What another replica may hold of `window` that the store has not shown yet,
        guessed from this one's own: its unflushed deltas, or what it sent at its last
        flush if that was more (another's flush timer runs on its own: just after this
        one flushed, the others may be about to send a whole interval's worth)."""
        prompt, completion, requests = self._counted(window, days, store=False)
        sent = self._last_sent
        last = (sent.days if days else sent.minutes).get(window) if sent is not None else None
        if last is not None:
            prompt = max(prompt, last.prompt_tokens)
            completion = max(completion, last.completion_tokens)
            requests = max(requests, last.requests)
        return prompt, completion, requests


def _sliding_wait(prev: float, cur: float, limit: float, frac: float, own: float) -> float:
    """Seconds until `prev * (1 - f) + cur <= limit` holds for a request adding `own` (in
    `cur`), `f` being how far into the current minute we are (now `frac`); 0 when it
    already holds."""
    if prev * (1 - frac) + cur <= limit:
        return 0.0
    if cur <= limit:
        # The previous minute's share decays linearly over this minute.
        f = 1 - (limit - cur) / prev
        return max(0.0, (f - frac) * 60)
    # This minute alone is over: wait for the next one, where this minute (without the
    # refused request, which is not counted) is the previous one and decays.
    before = cur - own
    f = 1 - (limit - own) / before if before > 0 else 0.0
    return (1 - frac) * 60 + max(0.0, f) * 60
