"""The request path's metrics are plain numbers (`metrics.Counts`, `metrics.Buckets`) made
into families at scrape time: their exposition must be what prometheus-client's own
Counter and Histogram write for the same observations, bucket edges included (a value
equal to a bound is in that bucket)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from tollgate_gateway.metrics import Buckets, Counts, RequestFamilies

BOUNDS = (0.005, 0.01, 0.025, 0.1, 1, 10)
VALUES = (0.0, 0.005, 0.0051, 0.01, 0.3, 1.0, 9.99, 10.0, 10.5, 1e6)


def exposition(registry: CollectorRegistry) -> list[str]:
    """The samples, without `_created` (the gateway exports none)."""
    return [
        line for line in generate_latest(registry).decode().splitlines() if "_created" not in line
    ]


def test_buckets_write_what_a_prometheus_histogram_writes() -> None:
    reference = CollectorRegistry()
    histogram = Histogram("t_seconds", "Help.", ["route"], buckets=BOUNDS, registry=reference)
    ours = Buckets("t_seconds", "Help.", ["route"], BOUNDS)
    mine = CollectorRegistry()
    mine.register(RequestFamilies([ours]))
    for i, value in enumerate(VALUES):
        route = "/a" if i % 3 else "/b"
        histogram.labels(route).observe(value)
        ours.observe((route,), value)
    assert exposition(mine) == exposition(reference)
    assert 't_seconds_bucket{le="0.005",route="/a"} 1.0' in exposition(mine)  # 0.005 <= 0.005


def test_counts_write_what_a_prometheus_counter_writes() -> None:
    reference = CollectorRegistry()
    counter = Counter("t_tokens", "Help.", ["key", "type"], registry=reference)
    ours = Counts("t_tokens", "Help.", ["key", "type"])
    mine = CollectorRegistry()
    mine.register(RequestFamilies([ours]))
    for key, kind, amount in (("a", "input", 3), ("a", "output", 5), ("b", "input", 1)) * 2:
        counter.labels(key, kind).inc(amount)
        ours.inc((key, kind), amount)
    assert exposition(mine) == exposition(reference)
