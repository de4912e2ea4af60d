"""The per-IP limit (GCRA) and the client address behind trusted proxies."""

from __future__ import annotations

import pytest
from clocks import ManualClock

from tollgate_gateway.podshare import RateTable, pod_lock
from tollgate_gateway.ratelimit import ClientAddress, Gcra


def gcra(rate: float, burst: int, clock: ManualClock) -> Gcra:
    return Gcra(rate, burst, RateTable(pod_lock(1)), clock)


@pytest.mark.parametrize(("rate", "burst"), [(10.0, 3), (3.0, 5), (0.5, 1), (100.0, 50)])
def test_exact_burst_then_refused(clock: ManualClock, rate: float, burst: int) -> None:
    limit = gcra(rate, burst, clock)
    assert [limit.check("a") for _ in range(burst)] == [0.0] * burst
    assert limit.check("a") == pytest.approx(1 / rate, abs=1e-6)


def test_exact_burst_at_any_clock_value() -> None:
    """Float rounding at a large clock value must not eat into the burst."""
    for start in (0.0, 285_120.0, 1_000_000.7, 12_345.6, 1_795_000_000.123, 4e9):
        for rate, burst in ((10.0, 3), (3.0, 5), (7.0, 4), (100.0, 50), (1 / 3, 2)):
            limit = gcra(rate, burst, ManualClock(start))
            assert [limit.check("a") for _ in range(burst)] == [0.0] * burst, (start, rate)
            assert limit.check("a") == pytest.approx(1 / rate, abs=1e-6), (start, rate)


def test_refused_requests_are_not_counted(clock: ManualClock) -> None:
    limit = gcra(2.0, 2, clock)
    assert limit.check("a") == limit.check("a") == 0.0
    for _ in range(5):
        assert limit.check("a") == pytest.approx(0.5, abs=1e-6)
    clock.advance(0.5)
    assert limit.check("a") == 0.0
    assert limit.check("a") == pytest.approx(0.5, abs=1e-6)


def test_retry_after_is_when_the_next_request_passes(clock: ManualClock) -> None:
    limit = gcra(4.0, 2, clock)
    limit.check("a"), limit.check("a")
    clock.advance(0.1)
    wait = limit.check("a")
    assert wait == pytest.approx(0.15, abs=1e-6)
    clock.advance(wait - 1e-3)
    assert limit.check("a") > 0
    clock.advance(2e-3)
    assert limit.check("a") == 0.0


def test_steady_rate_passes_forever(clock: ManualClock) -> None:
    limit = gcra(4.0, 1, clock)  # 0.25 s apart: exact in binary
    for _ in range(1000):
        assert limit.check("a") == 0.0
        clock.advance(0.25)


def test_steady_rate_above_the_limit_is_cut_to_it(clock: ManualClock) -> None:
    limit, start = gcra(5.0, 10, clock), clock.now
    allowed = 0
    for i in range(1000):  # 10 requests per second for 100 s
        clock.now = start + i / 10
        allowed += limit.check("a") == 0.0
    assert allowed == 10 + 499  # the burst, then one every 0.2 s up to t = 99.9


def test_clients_are_independent(clock: ManualClock) -> None:
    limit = gcra(1.0, 1, clock)
    assert limit.check("a") == 0.0
    assert limit.check("a") > 0
    assert limit.check("b") == 0.0


def test_idle_clients_are_swept(clock: ManualClock) -> None:
    limit = gcra(1.0, 5, clock)
    for client in ("a", "b", "c"):
        limit.check(client)
    assert limit.clients == 3
    clock.advance(30)  # all three back at a full burst
    limit.check("d")
    assert limit.clients == 1
    # a swept client starts again with a full burst
    assert [limit.check("a") for _ in range(5)] == [0.0] * 5


def test_busy_clients_survive_the_sweep(clock: ManualClock) -> None:
    limit = gcra(1.0, 20, clock)
    for _ in range(20):
        limit.check("busy")
    limit.check("idle")
    clock.advance(15)  # busy is still 5 s ahead; idle is back at a full burst
    limit.check("other")
    assert limit.clients == 2
    assert limit.check("busy") == 0.0  # 15 s refilled 15 of its 20
    assert [limit.check("busy") for _ in range(14)] == [0.0] * 14
    assert limit.check("busy") > 0


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("203.0.113.9", b"198.51.100.1", "203.0.113.9"),  # untrusted peer: header ignored
        ("10.0.0.2", None, "10.0.0.2"),
        ("10.0.0.2", b"198.51.100.1", "198.51.100.1"),
        ("10.0.0.2", b"198.51.100.7, 198.51.100.1, 10.0.0.5", "198.51.100.1"),
        ("10.0.0.2", b"10.0.0.9, 10.0.0.5", "10.0.0.9"),  # all trusted: the left-most
        ("10.0.0.2", b"not-an-ip", "10.0.0.2"),
        ("10.0.0.2", b" 2001:db8::1 ", "2001:db8::1"),
        ("10.0.0.2", b",,", "10.0.0.2"),
    ],
)
def test_client_address(peer: str, forwarded: bytes | None, expected: str) -> None:
    assert ClientAddress(["10.0.0.0/8"]).of(peer, forwarded) == expected


def test_no_trusted_proxies_means_the_peer() -> None:
    assert ClientAddress([]).of("10.0.0.2", b"198.51.100.1") == "10.0.0.2"
