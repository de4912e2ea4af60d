"""Choosing a replica: power of two choices, the replicas never chosen, session affinity.

Replicas are plain `Upstream` objects whose health, load, breaker and models a test sets;
the global `random` is seeded per test, so each run makes the same choices.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator

import pytest
from clocks import ManualClock

from tollgate_gateway.breaker import CircuitBreaker, State
from tollgate_gateway.settings import load_settings
from tollgate_gateway.upstream import Upstream, UpstreamPool

OPEN_SECONDS = 30.0


@pytest.fixture(autouse=True)
def seeded() -> Iterator[None]:
    state = random.getstate()
    random.seed(20261202)
    yield
    random.setstate(state)


def replica(
    name: str, clock: ManualClock, inflight: int = 0, models: set[str] | None = None
) -> Upstream:
    upstream = Upstream(f"http://{name}:8000", CircuitBreaker(3, OPEN_SECONDS, clock), models)
    upstream.healthy = True
    upstream.inflight = inflight
    return upstream


def pool_of(*upstreams: Upstream) -> UpstreamPool:
    pool = UpstreamPool(load_settings())
    pool.upstreams = list(upstreams)
    return pool


def open_breaker(upstream: Upstream) -> None:
    for _ in range(3):
        upstream.breaker.failure()
    assert upstream.breaker.state is State.OPEN


def picks(
    pool: UpstreamPool, n: int, model: str | None = None, exclude: Upstream | None = None
) -> Counter[str | None]:
    """How often each replica (by name; None: no replica) was chosen in `n` picks."""
    return Counter(getattr(pool.pick(model, exclude=exclude), "name", None) for _ in range(n))


# Power of two choices


def test_of_two_replicas_the_less_loaded_wins(clock: ManualClock) -> None:
    pool = pool_of(replica("a", clock, inflight=3), replica("b", clock, inflight=1))
    assert picks(pool, 200) == {"b:8000": 200}


def test_the_most_loaded_is_never_chosen_and_the_others_are(clock: ManualClock) -> None:
    loads = {"a": 0, "b": 1, "c": 2, "d": 9}
    pool = pool_of(*(replica(name, clock, inflight=n) for name, n in loads.items()))
    chosen = picks(pool, 600)
    assert "d:8000" not in chosen
    # P2C, not least-loaded: a wins whenever sampled (3 of 6 pairs), b in 2, c in 1
    assert chosen["a:8000"] > chosen["b:8000"] > chosen["c:8000"] > 0
    assert 0.4 < chosen["a:8000"] / 600 < 0.6


def test_unusable_replicas_are_never_chosen(clock: ManualClock) -> None:
    unhealthy = replica("unhealthy", clock)
    unhealthy.healthy = False
    broken = replica("broken", clock)
    open_breaker(broken)
    excluded = replica("excluded", clock)
    other_model = replica("other-model", clock, models={"other"})
    good = replica("good", clock, inflight=100, models={"m", "other"})
    pool = pool_of(unhealthy, broken, excluded, other_model, good)
    assert picks(pool, 300, model="m", exclude=excluded) == {"good:8000": 300}
    for session in range(50):
        assert pool.pick("m", f"s{session}", exclude=excluded) is good
    good.healthy = False
    assert pool.pick("m", exclude=excluded) is None
    assert pool.pick("m", "s1", exclude=excluded) is None


def test_a_replica_whose_models_are_unknown_is_tried_for_any(clock: ManualClock) -> None:
    unknown = replica("unknown", clock)
    pool = pool_of(unknown, replica("other", clock, models={"other"}))
    assert picks(pool, 50, model="m") == {"unknown:8000": 50}


def test_a_half_open_replica_gets_one_probe(clock: ManualClock) -> None:
    recovering, busy = replica("recovering", clock), replica("busy", clock, inflight=5)
    open_breaker(recovering)
    pool = pool_of(recovering, busy)
    assert picks(pool, 20) == {"busy:8000": 20}
    clock.advance(OPEN_SECONDS)
    assert pool.pick(None) is recovering  # less loaded: the probe
    assert picks(pool, 20) == {"busy:8000": 20}  # no second probe while it runs
    recovering.breaker.success()
    assert pool.pick(None) is recovering


def test_an_empty_pool_has_no_replica() -> None:
    assert pool_of().pick(None) is None


# The single-replica path


def test_single_replica(clock: ManualClock) -> None:
    only = replica("only", clock, models={"m"})
    pool = pool_of(only)
    assert pool.pick("m") is only and pool.pick("m", "session") is only
    assert pool.pick(None) is only
    assert pool.pick("other") is None
    assert pool.pick("m", exclude=only) is None
    only.healthy = False
    assert pool.pick("m") is None
    only.healthy = True
    open_breaker(only)
    assert pool.pick("m") is None
    clock.advance(OPEN_SECONDS)
    assert pool.pick("m") is only  # the probe
    assert pool.pick("m") is None


# Session affinity


def sessions(pool: UpstreamPool, n: int = 600) -> dict[str, str]:
    chosen = {}
    for i in range(n):
        upstream = pool.pick(None, f"session-{i}")
        assert upstream is not None
        chosen[f"session-{i}"] = upstream.name
    return chosen


def test_affinity_is_stable_whatever_the_load(clock: ManualClock) -> None:
    replicas = [replica(name, clock) for name in "abcde"]
    pool = pool_of(*replicas)
    first = sessions(pool)
    for upstream, load in zip(replicas, (50, 0, 7, 3, 1), strict=True):
        upstream.inflight = load
    assert sessions(pool) == first
    spread = Counter(first.values())
    assert len(spread) == 5 and min(spread.values()) > 600 / 5 / 2


def test_a_replica_going_away_moves_only_its_sessions(clock: ManualClock) -> None:
    replicas = [replica(name, clock) for name in "abcde"]
    pool = pool_of(*replicas)
    before = sessions(pool)
    lost = replicas[2]
    for gone in ("unhealthy", "removed"):
        if gone == "unhealthy":
            lost.healthy = False
        else:
            lost.healthy = True
            pool.upstreams = [u for u in replicas if u is not lost]  # DNS dropped it
        after = sessions(pool)
        moved = {s for s in before if after[s] != before[s]}
        assert moved == {s for s, name in before.items() if name == lost.name}, gone
        assert len({after[s] for s in moved}) > 1  # spread, not all onto one
    pool.upstreams = replicas
    assert sessions(pool) == before  # back: every session returns


def test_a_replica_joining_takes_sessions_only_for_itself(clock: ManualClock) -> None:
    replicas = [replica(name, clock) for name in "abcd"]
    pool = pool_of(*replicas)
    before = sessions(pool)
    pool.upstreams = [*replicas, replica("e", clock)]
    after = sessions(pool)
    moved = {s for s in before if after[s] != before[s]}
    assert moved and {after[s] for s in moved} == {"e:8000"}


def test_a_retry_goes_where_the_session_would_go_without_its_replica(
    clock: ManualClock,
) -> None:
    replicas = [replica(name, clock) for name in "abcde"]
    pool = pool_of(*replicas)
    for i in range(100):
        session = f"session-{i}"
        home = pool.pick(None, session)
        assert home is not None
        retry = pool.pick(None, session, exclude=home)
        home.healthy = False
        assert retry is not None and retry is not home
        assert pool.pick(None, session) is retry
        home.healthy = True


def test_retry_after_is_the_open_breakers_time_left(clock: ManualClock) -> None:
    broken, unhealthy = replica("broken", clock), replica("unhealthy", clock)
    open_breaker(broken)
    unhealthy.healthy = False
    clock.advance(10)
    assert pool_of(broken, unhealthy).retry_after() == pytest.approx(OPEN_SECONDS - 10)
