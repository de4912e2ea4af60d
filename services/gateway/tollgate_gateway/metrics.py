"""Every Prometheus metric the gateway exports: names, help texts and labels, defined here
once (the dashboard, the alert rules and the tests read these names).

The request path touches metrics in one place, `GatewayMetrics.observe`, at the end of a
request. Its counters and histograms are plain numbers in dicts keyed by label tuple
(`Counts`, `Buckets`), turned into metric families only at scrape time: an update is a
dict lookup and an add, where prometheus-client's own metric objects take a lock and a
few calls per series (its histogram one per bucket it walks). Scrapes run on the
gateway's loop (`metrics_server.py`), so no lock is needed. State that already lives
elsewhere (breaker, in-flight count, quota store, config) is read at scrape time by a
collector, never updated on the request path.

Cardinality is bounded: `key` is a key's *name* from the configuration (never a key or a
hash); `model` is a model the gateway knows (served, listed by the upstream, or named in a
key's allow-list), anything else is folded into "other".

Where OpenTelemetry's GenAI semantic conventions define a measure, these follow its
meaning: `tollgate_time_to_first_token_seconds` is `gen_ai.server.time_to_first_token`,
`tollgate_time_per_output_token_seconds` is `gen_ai.server.time_per_output_token`, and
`tollgate_tokens_total{type="input"|"output"}` counts `gen_ai.client.token.usage` by
`gen_ai.token.type`.

With `GATEWAY_WORKERS` > 1 each worker keeps its own and the supervisor merges them at
each scrape (`merge_workers`): a series is summed over the workers, except the gauges
that say a state or a time, named in `POD_MIN` and `POD_MAX`.
"""

from __future__ import annotations

import itertools
import platform
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from tollgate_gateway import version

if TYPE_CHECKING:
    from tollgate_gateway.config_watch import ConfigWatcher, CurrentConfig
    from tollgate_gateway.fairqueue import FairQueue
    from tollgate_gateway.lifecycle import Lifecycle
    from tollgate_gateway.quota import QuotaLedger
    from tollgate_gateway.record import RequestRecord
    from tollgate_gateway.upstream import UpstreamPool

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OTHER_MODEL = "other"
# Gauges whose pod value is the workers' lowest: up only if every worker says so; the
# oldest flush and start.
POD_MIN = frozenset(
    {
        "tollgate_upstream_up",
        "tollgate_config_last_reload_ok",
        "tollgate_quota_store_up",
        "tollgate_quota_last_flush_timestamp_seconds",
        "process_start_time_seconds",
    }
)
# Gauges whose pod value is the highest: a state any worker is in, a count they all see
# (each worker reads the same replica's vLLM metrics).
POD_MAX = frozenset(
    {
        "tollgate_circuit_breaker_state",
        "tollgate_draining",
        "tollgate_config_keys",
        "tollgate_upstream_vllm_requests_running",
        "tollgate_upstream_vllm_requests_waiting",
        "tollgate_upstream_vllm_kv_cache_usage",
        "tollgate_quota_replicas",
        "process_max_fds",
    }
)

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 30)
_TPOT = (0.001, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1)
_OVERHEAD = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

# The `reason` label of tollgate_rejections_total.
REJECTION_REASONS = (
    "size",
    "ip_rate",
    "auth",
    "invalid",
    "model",
    "concurrency",
    "quota",
    "rate",
    "breaker",
    "quota_store",
    "unknown_model",
    "no_upstream",
    "overload",
)


class Counts:
    """A counter family as plain numbers, one per label tuple."""

    __slots__ = ("documentation", "labels", "name", "values")

    def __init__(self, name: str, documentation: str, labels: Iterable[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = list(labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, labels: tuple[str, ...], amount: float = 1) -> None:
        values = self.values
        values[labels] = values.get(labels, 0) + amount

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, value in self.values.items():
            family.add_metric(labels, value)
        return family


class Buckets:
    """A histogram family as plain numbers: per label tuple, the observations in each
    bucket (not yet cumulative: one add per observation) and, last, their sum."""

    __slots__ = ("_le", "bounds", "documentation", "labels", "name", "series")

    def __init__(
        self, name: str, documentation: str, labels: Iterable[str], bounds: Iterable[float]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = list(labels)
        self.bounds = tuple(float(bound) for bound in bounds)
        self._le = [*(floatToGoString(bound) for bound in self.bounds), "+Inf"]  # type: ignore[no-untyped-call]
        self.series: dict[tuple[str, ...], list[float]] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        counts = self.series.get(labels)
        if counts is None:
            counts = self.series[labels] = [0.0] * (len(self.bounds) + 2)
        counts[bisect_left(self.bounds, value)] += 1  # the first bucket with value <= le
        counts[-1] += value

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, counts in self.series.items():
            cumulative = itertools.accumulate(counts[:-1])
            family.add_metric(labels, list(zip(self._le, cumulative, strict=True)), counts[-1])
        return family


class RequestFamilies(Collector):
    """The request path's counters and histograms, as families at scrape time."""

    def __init__(self, families: Iterable[Counts | Buckets]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield family.family()


class GatewayMetrics:
    def __init__(self, state: StateCollector) -> None:
        """`state`: the gauges read from the gateway's parts at scrape time."""
        self.requests = Counts(
            "tollgate_requests",
            "Requests answered, by route, GenAI operation (chat, embeddings, responses, ...),"
            " model, key name and HTTP status.",
            ["route", "operation", "model", "key", "status"],
        )
        self.duration = Buckets(
            "tollgate_request_duration_seconds",
            "Time from request to the last response byte, by route and model.",
            ["route", "model", "stream"],
            _LATENCY,
        )
        self.ttft = Buckets(
            "tollgate_time_to_first_token_seconds",
            "Streams: time from request to the first streamed chunk"
            " (gen_ai.server.time_to_first_token).",
            ["model"],
            _TTFT,
        )
        self.tpot = Buckets(
            "tollgate_time_per_output_token_seconds",
            "Streams: time per output token after the first (gen_ai.server.time_per_output_token).",
            ["model"],
            _TPOT,
        )
        self.overhead = Buckets(
            "tollgate_gateway_overhead_seconds",
            "Time spent in the gateway itself, excluding waits on the upstream.",
            ["route"],
            _OVERHEAD,
        )
        self.upstream_latency = Buckets(
            "tollgate_upstream_latency_seconds",
            "Time spent waiting on the upstream (response headers, body, stream chunks).",
            ["route"],
            _LATENCY,
        )
        self.tokens = Counts(
            "tollgate_tokens",
            "Tokens counted from the upstream's usage, by key name, model, operation and type"
            " (input = prompt, output = completion; gen_ai.client.token.usage).",
            ["key", "model", "operation", "type"],
        )
        self.rejections = Counts(
            "tollgate_rejections",
            "Requests refused by the gateway before reaching the upstream, by reason: "
            + ", ".join(REJECTION_REASONS)
            + "; and by key name ('none' before the key is known).",
            ["reason", "key"],
        )
        self.upstream_errors = Counts(
            "tollgate_upstream_errors",
            "Upstream failures seen by the gateway, by kind (unreachable, timeout,"
            " error, stream_broken, status_5xx).",
            ["kind"],
        )
        self.quota_flush = Buckets(
            "tollgate_quota_flush_duration_seconds",
            "Duration of successful flushes of usage to the quota store.",
            [],
            (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(
            RequestFamilies(
                (
                    self.requests,
                    self.duration,
                    self.ttft,
                    self.tpot,
                    self.overhead,
                    self.upstream_latency,
                    self.tokens,
                    self.rejections,
                    self.upstream_errors,
                    self.quota_flush,
                )
            )
        )
        self.registry.register(state)
        ProcessCollector(registry=self.registry)
        self._known_models: frozenset[str] = frozenset()

    def set_known_models(self, models: Iterable[str]) -> None:
        self._known_models = frozenset(models)

    def model_label(self, model: str | None) -> str:
        if not model:
            return "default"
        return model if model in self._known_models else OTHER_MODEL

    def observe(self, ex: RequestRecord, latency: float) -> None:
        """Everything one request contributes; called once, when it ends."""
        model = self.model_label(ex.model)
        key = ex.key_name or "none"
        route = ex.route
        self.requests.inc((route, ex.operation, model, key, str(ex.status)))
        if ex.rejection is not None:
            self.rejections.inc((ex.rejection, key))
            return
        self.duration.observe((route, model, "true" if ex.stream else "false"), latency)
        self.overhead.observe((route,), latency - ex.upstream_seconds)
        if ex.upstream_status is not None or ex.upstream_seconds:
            self.upstream_latency.observe((route,), ex.upstream_seconds)
        if ex.upstream_error is not None:
            self.upstream_errors.inc((ex.upstream_error,))
        usage = ex.usage
        if usage is not None:
            if usage.prompt_tokens:
                self.tokens.inc((key, model, ex.operation, "input"), usage.prompt_tokens)
            if usage.completion_tokens:
                self.tokens.inc((key, model, ex.operation, "output"), usage.completion_tokens)
        if ex.stream and ex.ttft_seconds is not None:
            self.ttft.observe((model,), ex.ttft_seconds)
            if usage is not None and usage.completion_tokens > 1:
                per_token = (latency - ex.ttft_seconds) / (usage.completion_tokens - 1)
                self.tpot.observe((model,), per_token)

    def observe_flush(self, seconds: float) -> None:
        self.quota_flush.observe((), seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StateCollector(Collector):
    """Gauges read from the gateway's own state at scrape time."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        pool: UpstreamPool,
        quota: QuotaLedger,
        current: CurrentConfig,
        config: ConfigWatcher,
        queue: FairQueue | None = None,
    ) -> None:
        self.lifecycle = lifecycle
        self.queue = queue
        self.pool = pool
        self.quota = quota
        self.current = current
        self.config = config

    def collect(self) -> Iterable[Any]:
        info = InfoMetricFamily("tollgate_build", "Version of the running gateway.")
        info.add_metric([], {"version": version(), "python": platform.python_version()})
        yield info
        yield GaugeMetricFamily(
            "tollgate_requests_in_flight",
            "Requests being proxied now.",
            value=self.lifecycle.inflight,
        )
        if self.queue is not None:
            yield GaugeMetricFamily(
                "tollgate_queue_waiting",
                "Requests waiting for a place on a replica (every one serving their model"
                " is at GATEWAY_UPSTREAM_MAX_IN_FLIGHT).",
                value=self.queue.waiting,
            )
        upstreams = self.pool.upstreams
        up = GaugeMetricFamily(
            "tollgate_upstream_up",
            "1 when the replica's /health answered 200 at the last poll.",
            labels=["upstream"],
        )
        inflight = GaugeMetricFamily(
            "tollgate_upstream_in_flight", "Requests in flight per replica.", labels=["upstream"]
        )
        sent = CounterMetricFamily(
            "tollgate_upstream_requests",
            "Requests sent to each replica (retries included).",
            labels=["upstream"],
        )
        state = GaugeMetricFamily(
            "tollgate_circuit_breaker_state",
            "Each replica's circuit breaker state: 1 for the current one.",
            labels=["upstream", "state"],
        )
        transitions = CounterMetricFamily(
            "tollgate_circuit_breaker_transitions",
            "Circuit breaker state changes, per replica.",
            labels=["upstream", "from_state", "to_state"],
        )
        vllm = {
            field: GaugeMetricFamily(
                f"tollgate_upstream_vllm_{name}",
                f"{text} at the last read of the replica's vLLM /metrics (GATEWAY_ROUTING=vllm).",
                labels=["upstream"],
            )
            for field, name, text in (
                ("running", "requests_running", "Requests running"),
                ("waiting", "requests_waiting", "Requests waiting"),
                ("kv_usage", "kv_cache_usage", "KV-cache use (0 to 1)"),
            )
        }
        prefill = GaugeMetricFamily(
            "tollgate_upstream_prefill_bytes",
            "Prompt bytes sent to the replica to compute that have no answer byte yet"
            " (the vllm scorer's prefill work; GATEWAY_ROUTING=vllm).",
            labels=["upstream"],
        )
        scored = self.pool.scorer is not None
        for u in upstreams:
            if u.load is not None:
                for field, family in vllm.items():
                    family.add_metric([u.name], getattr(u.load, field))
            if scored:
                prefill.add_metric([u.name], u.prefilling)
            up.add_metric([u.name], 1 if u.healthy else 0)
            inflight.add_metric([u.name], u.inflight)
            sent.add_metric([u.name], u.requests)
            current = u.breaker.state.value
            for name in ("closed", "open", "half_open"):
                state.add_metric([u.name, name], 1 if name == current else 0)
            for (old, new), count in u.breaker.transitions.items():
                transitions.add_metric([u.name, old, new], count)
        yield from (up, inflight, sent, state, transitions, *vllm.values())
        if scored:
            yield prefill
        yield CounterMetricFamily(
            "tollgate_upstream_retries",
            "Requests sent again to another replica after failing before any response byte.",
            value=self.pool.retries,
        )
        dns = CounterMetricFamily(
            "tollgate_upstream_dns_refreshes",
            "Lookups of VLLM_DNS_NAME, by result.",
            labels=["result"],
        )
        for result, count in self.pool.dns_refreshes.items():
            dns.add_metric([result], count)
        yield dns
        yield GaugeMetricFamily(
            "tollgate_draining",
            "1 after SIGTERM, while draining.",
            value=int(self.lifecycle.draining),
        )
        config = InfoMetricFamily(
            "tollgate_config", "The configuration document in use (its content hash)."
        )
        config.add_metric([], {"version": self.current.version})
        yield config
        yield GaugeMetricFamily(
            "tollgate_config_keys",
            "Keys in the configuration in use.",
            value=len(self.current.ring),
        )
        reloads = CounterMetricFamily(
            "tollgate_config_reloads",
            "Reloads of the configuration document, by result (a failed one keeps the last"
            " good document).",
            labels=["result"],
        )
        reloads.add_metric(["ok"], self.config.reloads_ok)
        reloads.add_metric(["failed"], self.config.reloads_failed)
        yield reloads
        yield GaugeMetricFamily(
            "tollgate_config_last_reload_ok",
            "1 when the last configuration document seen was valid; 0 while a rejected one"
            " is pending (the last good one is in use).",
            value=int(self.config.last_ok),
        )
        quota = self.quota
        yield GaugeMetricFamily(
            "tollgate_quota_store_up",
            "1 when the last flush to the quota store succeeded.",
            value=int(quota.store_ok),
        )
        yield GaugeMetricFamily(
            "tollgate_quota_replicas",
            "Replicas (processes) sharing the quota store, as its last answer counted them:"
            " near a limit each admits about limit / this before confirming with the store.",
            value=quota.replicas,
        )
        yield GaugeMetricFamily(
            "tollgate_quota_buffered_deltas",
            "Usage counters (key x window) not yet flushed to the quota store.",
            value=quota.buffered_deltas(),
        )
        yield CounterMetricFamily(
            "tollgate_quota_flush_errors",
            "Failed flushes to the quota store (usage stays buffered and is retried).",
            value=quota.flush_errors,
        )
        yield GaugeMetricFamily(
            "tollgate_quota_last_flush_timestamp_seconds",
            "Unix time of the last successful flush to the quota store.",
            value=quota.last_flush_at,
        )


def merge_workers(texts: Iterable[str]) -> str:
    """One exposition from the workers' own: each series summed over them (counters,
    histograms, in-flight counts, CPU and memory), the lowest or highest value for the
    gauges in `POD_MIN` and `POD_MAX`, and `_info` series as they are (1)."""
    heads: dict[str, list[str]] = {}
    samples: dict[str, dict[str, float]] = {}
    for text in texts:
        family = ""
        for line in text.splitlines():
            if line.startswith("#"):
                parts = line.split(" ", 3)
                if len(parts) >= 3:
                    family = parts[2]
                    head = heads.setdefault(family, [])
                    if line not in head:
                        head.append(line)
                    samples.setdefault(family, {})
                continue
            series, _, raw = line.rpartition(" ")
            if not series:
                continue
            value = float(raw)
            seen = samples.setdefault(family, {})
            if series not in seen:
                seen[series] = value
            elif family in POD_MIN:
                seen[series] = min(seen[series], value)
            elif family in POD_MAX or family.endswith("_info"):
                seen[series] = max(seen[series], value)
            else:
                seen[series] += value
    out: list[str] = []
    for family, head in heads.items():
        out.extend(head)
        for series, value in samples[family].items():
            out.append(f"{series} {floatToGoString(value)}")  # type: ignore[no-untyped-call]
    return "\n".join(out) + "\n" if out else ""
