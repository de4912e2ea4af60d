"""The quota ledger against a real SQLite store on a temporary file, with a manual clock.

The ledger's interface is the lead's and still moving: the few calls it makes go through
`admit`, `refusal`, `retry_after` and `usage` below, so a change there is one edit.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from clocks import ManualClock

from tollgate_contract.config import Policy
from tollgate_contract.usage import Usage
from tollgate_gateway import errors
from tollgate_gateway.errors import Refusal
from tollgate_gateway.keys import ApiKey, key_hash
from tollgate_gateway.podshare import KeyCounts, pod_lock
from tollgate_gateway.quota import Admission, QuotaLedger
from tollgate_gateway.stores import Batch, DayWindow, MinuteWindow, Totals
from tollgate_gateway.stores.sqlite import SqliteStore

DAY0 = 20_775 * 86_400  # 2026-11-18 00:00:00 UTC: a minute and a day boundary
FLUSH_SECONDS = 2.0


def day_text(now: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(now))


def key(**limits: int) -> ApiKey:
    return ApiKey("team-a", key_hash("sk-a"), Policy(**limits))


def admit(
    ledger: QuotaLedger, api_key: ApiKey, prompt: int = 10, completion: int = 10
) -> Admission:
    return ledger.admit(api_key, prompt, completion)


def refusal(
    ledger: QuotaLedger, api_key: ApiKey, prompt: int = 10, completion: int = 10
) -> Refusal:
    with pytest.raises(Refusal) as info:
        ledger.admit(api_key, prompt, completion)
    return info.value


def retry_after(refused: Refusal) -> int:
    return int(dict(refused.headers)[b"retry-after"])


def usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt, completion, 1)


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(DAY0 + 3600.0)


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "quota.db")


def ledger_on(path: str, clock: ManualClock, **options: Any) -> QuotaLedger:
    """`options`: QuotaLedger's own (`fail_closed`, `exact_margin`, `counts`)."""
    return QuotaLedger(SqliteStore(path), FLUSH_SECONDS, clock=clock, **options)


# Admission without the store: reservations, windows, concurrency


def test_reservations_count_against_tokens_per_day(db: str, clock: ManualClock) -> None:
    ledger, limited = ledger_on(db, clock), key(tokens_per_day=1000)
    first = admit(ledger, limited, 100, 400)
    admit(ledger, limited, 100, 400)  # 500 reserved + 400 it may generate: fits
    refused = refusal(ledger, limited, 1, 1)  # 1000 reserved: nothing left
    assert refused.kind is errors.QUOTA_EXCEEDED and refused.reason == "quota"
    assert retry_after(refused) == 86_400 - 3600  # at 00:00 UTC
    ledger.settle(first, usage(100, 50))  # 500 released, 150 used
    admit(ledger, limited, 10, 300)  # 150 + 500 + 310 reserved
    refused = refusal(ledger, limited, 10, 100)  # 960 committed: 40 left, may generate 100
    assert refused.kind is errors.QUOTA_EXCEEDED and "40 left" in refused.message
    day, today = ledger.today("team-a")
    assert day == day_text(clock.now)
    assert (today.prompt_tokens, today.completion_tokens, today.requests) == (100, 50, 3)


def test_requests_per_minute_slide(db: str, clock: ManualClock) -> None:
    ledger, limited = ledger_on(db, clock), key(requests_per_minute=3)
    for _ in range(3):
        admit(ledger, limited)
    assert refusal(ledger, limited).reason == "rate"
    start = clock.now
    clock.now = start + 90  # half-way into the next minute: the last one weighs 3 * 0.5
    admit(ledger, limited)  # 1.5 + 1
    refused = refusal(ledger, limited)  # 1.5 + 2 > 3
    # 10 s (2/3 into the minute); float rounding makes it 10.000000000000004, ceil 11
    assert refused.kind is errors.RATE_LIMITED and retry_after(refused) in (10, 11)
    clock.now = start + 99.9
    refusal(ledger, limited)
    clock.now = start + 100  # 2/3 in: 3 * 1/3 + 2 = 3
    admit(ledger, limited)
    clock.now = start + 240  # both windows empty again: a full minute's worth
    for _ in range(3):
        admit(ledger, limited)


def test_a_request_retried_at_retry_after_is_admitted(db: str, clock: ManualClock) -> None:
    ledger, limited = ledger_on(db, clock), key(requests_per_minute=3)
    clock.now = DAY0 + 60.0  # a minute's start
    for _ in range(3):
        admit(ledger, limited)
    wait = retry_after(refusal(ledger, limited))  # 75 today; 80 is when 3 * (1 - f) + 1 <= 3
    clock.advance(wait)
    admit(ledger, limited)


def test_tokens_per_minute_count_reservations_then_usage(db: str, clock: ManualClock) -> None:
    ledger, limited = ledger_on(db, clock), key(tokens_per_minute=1000)
    a = admit(ledger, limited, 10, 500)
    b = admit(ledger, limited, 10, 400)  # 510 reserved + 400: fits
    refused = refusal(ledger, limited, 0, 100)  # 920 reserved + 100 > 1000
    assert refused.kind is errors.RATE_LIMITED and refused.reason == "rate"
    ledger.settle(a, usage(300, 300))
    ledger.settle(b, usage(100, 200))  # 900 used this minute, nothing reserved
    admit(ledger, limited, 0, 100)
    refusal(ledger, limited, 0, 100)
    clock.advance(60 + 30)  # half-way into the next minute
    admit(ledger, limited, 0, 100)  # 900 * 0.5 + 100 reserved + 100
    refusal(ledger, limited, 0, 400)  # 450 + 200 reserved + 400 > 1000


def test_concurrency_is_per_in_flight_request(db: str, clock: ManualClock) -> None:
    ledger, limited = ledger_on(db, clock), key(max_concurrent_requests=2)
    first = admit(ledger, limited)
    admit(ledger, limited)
    refused = refusal(ledger, limited)
    assert refused.reason == "concurrency" and retry_after(refused) == 1
    ledger.settle(first, None)  # a failed request: released, no usage
    admit(ledger, limited)
    assert ledger.today("team-a")[1].tokens == 0


def test_a_key_without_policy_is_never_refused(db: str, clock: ManualClock) -> None:
    ledger = ledger_on(db, clock)
    free = ApiKey("free", key_hash("sk-free"))
    for _ in range(1000):
        admit(ledger, free, 10**6, 10**6)


def test_day_rolls_over_at_midnight_utc(db: str, clock: ManualClock) -> None:
    async def scenario() -> None:
        ledger, limited = ledger_on(db, clock), key(tokens_per_day=100)
        clock.now = DAY0 + 86_399.0
        late = admit(ledger, limited, 0, 0)  # a request still running at midnight
        ledger.settle(admit(ledger, limited, 0, 60), usage(40, 60))
        refused = refusal(ledger, limited, 0, 0)
        assert refused.kind is errors.QUOTA_EXCEEDED and retry_after(refused) == 1
        clock.now = DAY0 + 86_400.0
        ledger.settle(admit(ledger, limited, 0, 50), usage(10, 20))  # a new day's quota
        ledger.settle(late, usage(5, 5))  # counts on the day it ends
        day, today = ledger.today("team-a")
        assert day == day_text(DAY0 + 86_400) != day_text(DAY0)
        assert (today.tokens, today.requests) == (40, 1)
        assert await ledger.flush()
        store = ledger.store
        yesterday = await store.day_usage("team-a", day_text(DAY0))
        assert (yesterday.tokens, yesterday.requests) == (100, 2)
        new_day = await store.day_usage("team-a", day)
        assert (new_day.prompt_tokens, new_day.completion_tokens, new_day.requests) == (15, 25, 1)
        await ledger.close()

    run(scenario)


# Far from its limits a key is admitted on the room its last full check left: every way
# its counts can grow must take from that room, or end it. With no exact margin the room
# reaches the limit itself, so a room that outlived its counts admits past the limit.


def test_the_room_shrinks_with_each_request_and_with_usage_beyond_its_reservation(
    db: str, clock: ManualClock
) -> None:
    ledger, limited = (
        ledger_on(db, clock, exact_margin=0),
        key(requests_per_minute=3, tokens_per_day=1000),
    )
    ledger.settle(admit(ledger, limited, 10, 10), usage(500, 400))  # 900: an estimate too low
    refused = refusal(ledger, limited, 0, 200)
    assert refused.kind is errors.QUOTA_EXCEEDED and "100 left" in refused.message
    admit(ledger, limited, 0, 40)
    admit(ledger, limited, 0, 40)
    assert refusal(ledger, limited, 0, 0).reason == "rate"  # the fourth request this minute


def test_a_new_policy_is_judged_at_once(db: str, clock: ManualClock) -> None:
    ledger, generous = ledger_on(db, clock, exact_margin=0), key(tokens_per_day=1000)
    ledger.settle(admit(ledger, generous, 0, 10), usage(300, 300))
    admit(ledger, generous, 0, 10)
    assert refusal(ledger, key(tokens_per_day=500), 0, 10).kind is errors.QUOTA_EXCEEDED


def test_the_other_replicas_usage_ends_the_room_at_the_flush(db: str, clock: ManualClock) -> None:
    async def scenario() -> None:
        one, other, limited = (
            ledger_on(db, clock, exact_margin=0),
            ledger_on(db, clock, exact_margin=0),
            key(tokens_per_day=1000),
        )
        await one.start(["team-a"])
        admit(one, limited, 0, 10)
        other.settle(admit(other, limited, 0, 10), usage(450, 450))
        assert await other.flush() and await one.flush()
        assert "90 left" in refusal(one, limited, 0, 200).message  # 900 + 10 reserved
        await one.close()
        await other.close()

    run(scenario)


def test_the_other_workers_reservations_count_in_the_room(db: str, clock: ManualClock) -> None:
    pod = KeyCounts(pod_lock(2), 2)  # two workers' ledgers, one pod's in-flight counts
    one, other = (
        ledger_on(db, clock, exact_margin=0, counts=pod),
        ledger_on(db, clock, exact_margin=0, counts=pod),
    )
    limited = key(tokens_per_day=1000)
    admit(one, limited, 0, 10)
    admit(other, limited, 0, 900)
    assert "90 left" in refusal(one, limited, 0, 200).message


# The store: flushes, totals shared between replicas, outages


def test_flush_writes_totals_that_other_replicas_read(db: str, clock: ManualClock) -> None:
    async def scenario() -> None:
        one, limited = ledger_on(db, clock), key(tokens_per_day=1000)
        await one.start(["team-a"])
        ledger_b = ledger_on(db, clock)
        ledger_b.settle(admit(ledger_b, limited, 0, 0), usage(300, 300))
        assert ledger_b.buffered_deltas() > 0
        assert await ledger_b.flush() and ledger_b.buffered_deltas() == 0
        assert await ledger_b.flush()  # nothing new: nothing counted twice
        stored = await ledger_b.store.day_usage("team-a", day_text(clock.now))
        assert (stored.prompt_tokens, stored.completion_tokens, stored.requests) == (300, 300, 1)
        assert one.today("team-a")[1].tokens == 0  # not until its next flush
        assert await one.flush()
        assert one.today("team-a")[1].tokens == 600
        refused = refusal(one, limited, 0, 500)  # 600 used elsewhere + 500 > 1000
        assert "400 left" in refused.message
        await one.close()
        await ledger_b.close()

    run(scenario)


def test_close_flushes_what_is_buffered(db: str, clock: ManualClock) -> None:
    async def scenario() -> None:
        ledger = ledger_on(db, clock)
        await ledger.start([])
        ledger.settle(admit(ledger, key()), usage(7, 3))
        await ledger.close()
        reader = SqliteStore(db)
        await reader.start()
        assert (await reader.day_usage("team-a", day_text(clock.now))).tokens == 10
        await reader.close()

    run(scenario)


class Outage:
    """A real SqliteStore behind a switch: while `down`, every call fails as a lost
    connection would."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        self.shared = store.shared
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise ConnectionRefusedError("quota store down")

    async def start(self) -> None:
        self._check()
        await self.store.start()

    async def flush(
        self, batch: Batch, read_days: list[DayWindow], read_minutes: list[MinuteWindow]
    ) -> Totals:
        self._check()
        return await self.store.flush(batch, read_days, read_minutes)

    async def day_usage(self, key_name: str, day: str) -> Usage:
        self._check()
        return await self.store.day_usage(key_name, day)

    async def close(self) -> None:
        await self.store.close()


def test_fail_closed_refuses_while_the_store_is_down(db: str, clock: ManualClock) -> None:
    async def scenario() -> None:
        store = Outage(SqliteStore(db))
        ledger = QuotaLedger(store, FLUSH_SECONDS, fail_closed=True, clock=clock)
        limited = key(tokens_per_day=1000)
        await ledger.start(["team-a"])
        ledger.settle(admit(ledger, limited), usage(5, 5))
        store.down = True
        assert not await ledger.flush() and not ledger.store_ok
        assert ledger.flush_errors == 1
        refused = refusal(ledger, limited)
        assert refused.kind is errors.QUOTA_STORE_UNAVAILABLE
        assert refused.reason == "quota_store"
        assert retry_after(refused) == math.ceil(FLUSH_SECONDS)
        assert ledger.today("team-a")[1].tokens == 10  # kept, buffered
        store.down = False
        assert await ledger.flush() and ledger.store_ok
        admit(ledger, limited)
        stored = await store.day_usage("team-a", day_text(clock.now))
        assert (stored.tokens, stored.requests) == (10, 1)  # sent once, after the outage
        await ledger.close()

    run(scenario)


def test_fail_open_admits_and_buffers_while_the_store_is_down(
    tmp_path: Path, clock: ManualClock
) -> None:
    async def scenario() -> None:
        path = tmp_path / "not-yet" / "quota.db"  # SQLite cannot open it: down from the start
        ledger = ledger_on(str(path), clock)
        await ledger.start(["team-a"])
        assert not ledger.store_ok
        for _ in range(3):
            ledger.settle(admit(ledger, key(tokens_per_day=1000)), usage(10, 10))
        assert not await ledger.flush()
        path.parent.mkdir()
        assert await ledger.flush() and ledger.store_ok and ledger.buffered_deltas() == 0
        stored = await ledger.store.day_usage("team-a", day_text(clock.now))
        assert (stored.tokens, stored.requests) == (60, 3)
        await ledger.close()

    run(scenario)


def test_fail_closed_refuses_when_the_store_is_down_at_start(
    tmp_path: Path, clock: ManualClock
) -> None:
    async def scenario() -> None:
        path = tmp_path / "not-yet" / "quota.db"
        ledger = ledger_on(str(path), clock, fail_closed=True)
        await ledger.start(["team-a"])
        assert refusal(ledger, key()).kind is errors.QUOTA_STORE_UNAVAILABLE
        path.parent.mkdir()
        assert await ledger.flush()
        admit(ledger, key())
        await ledger.close()

    run(scenario)
