"""The tables the workers of one pod share, across real forked processes, and the merge of
their metrics."""

from __future__ import annotations

import os
from collections.abc import Callable

from tollgate_gateway.metrics import merge_workers
from tollgate_gateway.podshare import KeyCounts, PodShare, pod_lock
from tollgate_gateway.ratelimit import Gcra


def in_child(work: Callable[[], int]) -> int:
    """Run `work` in a forked child, as a worker would; its result as the exit status."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = work()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_burst_spent_in_one_worker_is_spent_for_all() -> None:
    share = PodShare(2)
    limit = Gcra(0.001, 5, share.rates)
    spent = in_child(lambda: sum(limit.check("203.0.113.9") == 0.0 for _ in range(3)))
    assert spent == 3
    assert [limit.check("203.0.113.9") == 0.0 for _ in range(3)] == [True, True, False]
    assert limit.check("203.0.113.10") == 0.0  # another client: its own burst
    assert limit.clients == 2


def test_in_flight_counts_are_summed_over_workers_and_cleared_per_worker() -> None:
    share = PodShare(2)
    counts = share.keys

    def worker_one() -> int:
        counts.worker = 1
        return 0 if counts.enter("team-a", 2, 100) == 0 else 1

    assert in_child(worker_one) == 0  # worker 1 holds one of team-a's two, and 100 tokens
    assert counts.enter("team-a", 2, 50) == 100  # worker 0: the second; sees worker 1's 100
    assert counts.enter("team-a", 2, 1) is None  # the pod is at the limit
    assert counts.reserved("team-a") == 150
    counts.leave("team-a", 50)
    assert counts.reserved("team-a") == 100

    def replacement() -> int:  # worker 1 died; its successor starts clean
        counts.worker = 1
        counts.clear_worker()
        return 0

    assert in_child(replacement) == 0
    assert counts.reserved("team-a") == 0
    assert counts.enter("team-a", 2, 1) == 0
    assert counts.enter("team-a", 2, 1) == 1


def test_a_full_window_refuses_instead_of_losing_a_count() -> None:
    class Tiny(KeyCounts):
        SLOTS = 16  # the window is the whole table

    counts = Tiny(pod_lock(1), 1)
    for i in range(16):
        assert counts.enter(f"key-{i}", None, 1) == 0
    assert counts.enter("one-too-many", None, 1) is None
    counts.leave("key-3", 1)  # a key with nothing in flight frees its slot
    assert counts.enter("one-too-many", None, 1) == 0
    assert counts.reserved("key-4") == 1


METRICS = """# HELP tollgate_requests_total Requests.
# TYPE tollgate_requests_total counter
tollgate_requests_total{key="a b",status="200"} {requests}
# HELP tollgate_upstream_up Up.
# TYPE tollgate_upstream_up gauge
tollgate_upstream_up{upstream="u1"} {up}
# HELP tollgate_circuit_breaker_state State.
# TYPE tollgate_circuit_breaker_state gauge
tollgate_circuit_breaker_state{state="open",upstream="u1"} {open}
# HELP tollgate_build_info Version.
# TYPE tollgate_build_info gauge
tollgate_build_info{version="1"} 1.0
# HELP tollgate_latency_seconds Latency.
# TYPE tollgate_latency_seconds histogram
tollgate_latency_seconds_bucket{le="+Inf"} {requests}
tollgate_latency_seconds_sum 0.5
"""


def _exposition(requests: float, up: float, open_: float) -> str:
    return (
        METRICS.replace("{requests}", str(requests))
        .replace("{up}", str(up))
        .replace("{open}", str(open_))
    )


def test_worker_metrics_merge_into_the_pods() -> None:
    merged = merge_workers([_exposition(3, 1, 0), _exposition(4, 0, 1)])
    assert merged.count("# TYPE tollgate_requests_total counter") == 1
    assert 'tollgate_requests_total{key="a b",status="200"} 7.0' in merged
    assert 'tollgate_upstream_up{upstream="u1"} 0.0' in merged  # up only if all see it up
    assert 'tollgate_circuit_breaker_state{state="open",upstream="u1"} 1.0' in merged
    assert 'tollgate_build_info{version="1"} 1.0' in merged
    assert 'tollgate_latency_seconds_bucket{le="+Inf"} 7.0' in merged
    assert "tollgate_latency_seconds_sum 1.0" in merged
    assert merge_workers([]) == ""


def test_workers_racing_for_one_client_are_judged_by_the_time_they_hold_the_lock() -> None:
    """Three workers (on fewer cores: some are descheduled mid-check) checking one client
    as fast as they can, far below its rate: none may be refused. A worker that read the
    clock before waiting for the lock compared the others' later times with its stale
    one and refused (seen under load: 429s at 3 000 requests/s, limit 1 000 000/s)."""
    share = PodShare(3)
    limit = Gcra(1_000_000.0, 2000, share.rates)

    def hammer() -> int:
        return min(1, sum(limit.check("203.0.113.9") > 0 for _ in range(20_000)))

    children = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            os._exit(hammer())
        children.append(pid)
    refused = [hammer()]
    refused += [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
    assert refused == [0, 0, 0]
