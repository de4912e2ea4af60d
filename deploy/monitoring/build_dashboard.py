"""Writes grafana-dashboard.json next to this file: the tollgate Grafana dashboard.

The JSON is generated so that 40-odd panels stay consistent (datasource, filters, units,
layout); edit this file and run it, never the JSON by hand:

    .venv/bin/python deploy/monitoring/build_dashboard.py

tests/monitoring checks that the committed JSON is what this script writes, and that every
metric its queries name exists in a real scrape of the gateway or the GPU exporter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("grafana-dashboard.json")
UID = "tollgate-overview"
DS = {"type": "prometheus", "uid": "${datasource}"}

# Label filters. `allValue: ".*"` also matches series without the label (a Prometheus that
# adds no `namespace`), so "All" never hides data.
GW = 'namespace=~"$namespace", job=~"$job"'
GWM = GW + ', model=~"$model"'
GPU = 'node=~"$node", gpu=~"$gpu"'
RATE = "$__rate_interval"


def q(expr: str, legend: str = "") -> dict[str, Any]:
    return {"expr": expr, "legendFormat": legend or "__auto"}


def quantiles(bucket: str, selector: str, by: str = "") -> list[dict[str, Any]]:
    """p50/p90/p99 of a histogram, aggregated over instances (and `by` labels)."""
    labels = f"{by}, le" if by else "le"
    prefix = f"{by}={{{{{by}}}}} " if by else ""
    return [
        q(
            f"histogram_quantile({p}, sum by ({labels}) (rate({bucket}{{{selector}}}[{RATE}])))",
            f"{prefix}p{round(p * 100)}",
        )
        for p in (0.5, 0.9, 0.99)
    ]


class Layout:
    """Places panels left to right, wrapping at Grafana's 24 columns."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.x = 0
        self.y = 0
        self.row_height = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_height
            self.x = 0
            self.row_height = 0

    def panel(
        self,
        title: str,
        targets: list[dict[str, Any]],
        *,
        description: str,
        unit: str = "short",
        kind: str = "timeseries",
        w: int = 8,
        h: int = 8,
        stack: bool = False,
        minimum: float | None = None,
        maximum: float | None = None,
        thresholds: list[tuple[float | None, str]] | None = None,
        mappings: list[dict[str, Any]] | None = None,
    ) -> None:
        if self.x + w > 24:
            self._newline()
        defaults: dict[str, Any] = {"unit": unit}
        if minimum is not None:
            defaults["min"] = minimum
        if maximum is not None:
            defaults["max"] = maximum
        if thresholds:
            defaults["thresholds"] = {
                "mode": "absolute",
                "steps": [{"value": v, "color": c} for v, c in thresholds],
            }
        if mappings:
            defaults["mappings"] = mappings
        if kind == "timeseries":
            defaults["custom"] = {
                "drawStyle": "line",
                "lineWidth": 1,
                "fillOpacity": 10,
                "showPoints": "never",
                "spanNulls": False,
                "stacking": {"mode": "normal" if stack else "none", "group": "A"},
            }
        options: dict[str, Any]
        if kind == "timeseries":
            options = {
                "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                "tooltip": {"mode": "multi", "sort": "desc"},
            }
        elif kind == "stat":
            options = {
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "colorMode": "background",
                "graphMode": "none",
                "textMode": "auto",
            }
        else:  # state-timeline
            options = {"showValue": "never", "mergeValues": True, "rowHeight": 0.9}
        refs = "ABCDEFGHIJ"
        self.panels.append(
            {
                "type": kind,
                "title": title,
                "description": description,
                "datasource": DS,
                "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
                "fieldConfig": {"defaults": defaults, "overrides": []},
                "options": options,
                "targets": [
                    {
                        "datasource": DS,
                        "refId": refs[i],
                        "range": kind != "stat",
                        "instant": kind == "stat",
                        **t,
                    }
                    for i, t in enumerate(targets)
                ],
            }
        )
        self.x += w
        self.row_height = max(self.row_height, h)


def variable(name: str, label: str, query: str, *, multi: bool = True) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": f"var-{name}"},
        "definition": query,
        "refresh": 2,
        "sort": 1,
        "multi": multi,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "hide": 0,
    }


def dashboard() -> dict[str, Any]:
    L = Layout()
    ok_bad = [(None, "red"), (1, "green")]

    L.row("Traffic")
    L.panel(
        "Request rate by route and status",
        [
            q(
                f"sum by (route, status) (rate(tollgate_requests_total{{{GWM}}}[{RATE}]))",
                "{{route}} {{status}}",
            )
        ],
        description="Requests answered per second, all replicas, by route and HTTP status.",
        unit="reqps",
        stack=True,
    )
    L.panel(
        "Error ratio (5xx, 4xx)",
        [
            q(
                f'sum(rate(tollgate_requests_total{{{GWM}, status=~"5.."}}[{RATE}]))'
                f" / sum(rate(tollgate_requests_total{{{GWM}}}[{RATE}]))",
                "5xx",
            ),
            q(
                f'sum(rate(tollgate_requests_total{{{GWM}, status=~"4.."}}[{RATE}]))'
                f" / sum(rate(tollgate_requests_total{{{GWM}}}[{RATE}]))",
                "4xx",
            ),
        ],
        description="Share of requests answered 5xx (gateway or upstream failing) and 4xx"
        " (auth, quota and rate refusals, bad requests).",
        unit="percentunit",
        minimum=0,
        thresholds=[(None, "green"), (0.05, "red")],
    )
    L.panel(
        "Rejections by reason",
        [
            q(
                f"sum by (reason) (rate(tollgate_rejections_total{{{GW}}}[{RATE}]))",
                "{{reason}}",
            )
        ],
        description="Requests refused before reaching the upstream, by reason (auth, rate,"
        " quota, concurrency, model, size, breaker, quota_store, …: see the metric's help).",
        unit="reqps",
        stack=True,
    )
    L.panel(
        "Rejections by key",
        [
            q(
                f"sum by (key, reason) (rate(tollgate_rejections_total{{{GW}}}[{RATE}]))",
                "{{key}} {{reason}}",
            )
        ],
        description='Which team is being refused, and why (key names; "none" before a'
        " key is known, e.g. auth failures).",
        unit="reqps",
        stack=True,
    )
    L.panel(
        "Requests in flight",
        [q(f"sum by (instance) (tollgate_requests_in_flight{{{GW}}})", "{{instance}}")],
        description="Requests being proxied now, per replica.",
        stack=True,
    )
    L.panel(
        "Requests by operation",
        [
            q(
                f"sum by (operation) (rate(tollgate_requests_total{{{GWM}}}[{RATE}]))",
                "{{operation}}",
            )
        ],
        description="Requests per second by GenAI operation: chat, text_completion,"
        " embeddings, responses, messages, rerank, score, transcription, tokenize, ...",
        unit="reqps",
        stack=True,
    )
    L.panel(
        "Tokens by operation",
        [
            q(
                f"sum by (operation, type) (rate(tollgate_tokens_total{{{GWM}}}[{RATE}]))",
                "{{operation}} {{type}}",
            )
        ],
        description="Tokens per second by operation, input and output, from the upstream's"
        " usage (audio seconds metered at 50 tokens a second).",
        unit="short",
        stack=True,
    )
    L.panel(
        "Requests per key",
        [
            q(
                f"sum by (key, status) (rate(tollgate_requests_total{{{GWM}}}[{RATE}]))",
                "{{key}} {{status}}",
            )
        ],
        description="Requests per second by key name and status (key names, never keys).",
        unit="reqps",
        stack=True,
    )
    L.panel(
        "Requests by model",
        [
            q(
                f"sum by (model) (rate(tollgate_requests_total{{{GWM}}}[{RATE}]))",
                "{{model}}",
            )
        ],
        description='Requests per second by model; unknown model names are folded into "other".',
        unit="reqps",
        stack=True,
    )

    L.row("Latency")
    L.panel(
        "Request latency",
        quantiles("tollgate_request_duration_seconds_bucket", GWM, "stream"),
        description="Request to last response byte, p50/p90/p99, streams and non-streams"
        " apart (a non-stream answer arrives after the whole generation).",
        unit="s",
    )
    L.panel(
        "Time to first token",
        quantiles("tollgate_time_to_first_token_seconds_bucket", GWM),
        description="Streams: request to first streamed chunk, p50/p90/p99"
        " (gen_ai.server.time_to_first_token).",
        unit="s",
    )
    L.panel(
        "Time per output token",
        quantiles("tollgate_time_per_output_token_seconds_bucket", GWM),
        description="Streams: time per output token after the first, p50/p90/p99"
        " (gen_ai.server.time_per_output_token).",
        unit="s",
    )
    L.panel(
        "Gateway overhead",
        quantiles("tollgate_gateway_overhead_seconds_bucket", GW),
        description="Time spent in the gateway itself, excluding waits on the upstream,"
        " p50/p90/p99.",
        unit="s",
    )
    L.panel(
        "Upstream latency",
        quantiles("tollgate_upstream_latency_seconds_bucket", GW),
        description="Time spent waiting on the upstream (headers, body, stream chunks),"
        " p50/p90/p99.",
        unit="s",
    )
    L.panel(
        "Upstream errors by kind",
        [
            q(
                f"sum by (kind) (rate(tollgate_upstream_errors_total{{{GW}}}[{RATE}]))",
                "{{kind}}",
            )
        ],
        description="Upstream failures seen by the gateway: unreachable, timeout, error,"
        " stream_broken, status_5xx.",
        unit="reqps",
        stack=True,
    )

    L.row("Tokens")
    L.panel(
        "Token rate per key",
        [
            q(
                f"sum by (key, type) (rate(tollgate_tokens_total{{{GWM}}}[{RATE}]))",
                "{{key}} {{type}}",
            )
        ],
        description="Tokens per second from the upstream's usage, by key name; input ="
        " prompt, output = completion.",
        unit="short",
        w=12,
        stack=True,
    )
    L.panel(
        "Tokens per key over the time range",
        [
            q(
                f"sum by (key, type) (increase(tollgate_tokens_total{{{GWM}}}[$__range]))",
                "{{key}} {{type}}",
            )
        ],
        description="Input and output tokens per key name over the dashboard's time range.",
        kind="stat",
        w=12,
    )

    L.row("Upstreams and circuit breakers")
    L.panel(
        "Upstream up",
        [q(f"min by (upstream) (tollgate_upstream_up{{{GW}}})", "{{upstream}}")],
        description="Per upstream (vLLM) replica: 1 when its /health answered 200 at the last"
        " poll of every gateway replica, 0 when any of them sees it down.",
        kind="state-timeline",
        thresholds=ok_bad,
        mappings=[{"type": "value", "options": {"0": {"text": "down"}, "1": {"text": "up"}}}],
    )
    L.panel(
        "Requests per upstream",
        [
            q(
                f"sum by (upstream) (rate(tollgate_upstream_requests_total{{{GW}}}[{RATE}]))",
                "{{upstream}}",
            )
        ],
        description="Requests sent to each upstream replica (retries included): the balance"
        " of the least-outstanding routing.",
        unit="reqps",
        stack=True,
    )
    L.panel(
        "In flight per upstream",
        [q(f"sum by (upstream) (tollgate_upstream_in_flight{{{GW}}})", "{{upstream}}")],
        description="Requests in flight to each upstream replica, all gateway replicas.",
        stack=True,
    )
    L.panel(
        "vLLM queue per upstream",
        [
            q(
                f"max by (upstream) (tollgate_upstream_vllm_requests_running{{{GW}}})",
                "{{upstream}} running",
            ),
            q(
                f"max by (upstream) (tollgate_upstream_vllm_requests_waiting{{{GW}}})",
                "{{upstream}} waiting",
            ),
        ],
        description="Each replica's own vLLM metrics as the gateway last read them"
        " (GATEWAY_ROUTING=vllm; empty otherwise): what the scorer ranks replicas by.",
    )
    L.panel(
        "vLLM KV-cache use",
        [
            q(
                f"max by (upstream) (tollgate_upstream_vllm_kv_cache_usage{{{GW}}})",
                "{{upstream}}",
            )
        ],
        description="Each replica's KV-cache use at the gateway's last read (GATEWAY_ROUTING"
        "=vllm); near 1 the replica preempts and its latency climbs.",
        unit="percentunit",
    )
    L.panel(
        "Prefill work sent, not yet answered",
        [q(f"sum by (upstream) (tollgate_upstream_prefill_bytes{{{GW}}})", "{{upstream}}")],
        description="Prompt bytes sent to each replica that have had no answer byte yet, all"
        " gateway replicas: the scorer's prefill term (GATEWAY_ROUTING=vllm). A replica far"
        " above the others is computing a long prompt.",
        unit="bytes",
        stack=True,
    )
    L.panel(
        "Waiting for a place",
        [q(f"sum by (instance) (tollgate_queue_waiting{{{GW}}})", "{{instance}}")],
        description="Requests waiting in the fair queues because every replica of their model"
        " is at GATEWAY_UPSTREAM_MAX_IN_FLIGHT (or its places are held for other keys).",
        stack=True,
    )
    L.panel(
        "Circuit breaker state",
        [
            q(
                f"sum by (upstream, state) (tollgate_circuit_breaker_state{{{GW}}})",
                "{{upstream}} {{state}}",
            )
        ],
        description="Per upstream replica, the number of gateway replicas whose breaker is in"
        " each state (closed, open, half_open).",
        stack=True,
    )
    L.panel(
        "Circuit breaker transitions",
        [
            q(
                "sum by (upstream, from_state, to_state) (increase("
                f"tollgate_circuit_breaker_transitions_total{{{GW}}}[{RATE}]))",
                "{{upstream}} {{from_state}} → {{to_state}}",
            )
        ],
        description="Breaker state changes; repeated closed → open means a flapping upstream.",
        stack=True,
    )
    L.panel(
        "Retries and DNS refreshes",
        [
            q(f"sum(rate(tollgate_upstream_retries_total{{{GW}}}[{RATE}]))", "retries"),
            q(
                f"sum by (result) (rate(tollgate_upstream_dns_refreshes_total{{{GW}}}[{RATE}]))",
                "DNS lookups {{result}}",
            ),
        ],
        description="Requests sent again to another replica after failing before any byte,"
        " and lookups of VLLM_DNS_NAME by result (none without it).",
        unit="ops",
    )

    L.row("Quota store")
    L.panel(
        "Quota store up",
        [q(f"min by (instance) (tollgate_quota_store_up{{{GW}}})", "{{instance}}")],
        description="1 when the replica's last flush to the quota store succeeded.",
        kind="state-timeline",
        thresholds=ok_bad,
        mappings=[{"type": "value", "options": {"0": {"text": "down"}, "1": {"text": "up"}}}],
    )
    L.panel(
        "Quota flush latency",
        quantiles("tollgate_quota_flush_duration_seconds_bucket", GW),
        description="Duration of successful flushes of usage to the store, p50/p90/p99.",
        unit="s",
    )
    L.panel(
        "Last flush age",
        [
            q(
                f"time() - max by (instance) (tollgate_quota_last_flush_timestamp_seconds{{{GW}}})",
                "{{instance}}",
            )
        ],
        description="Seconds since the replica's last successful flush (normally below the"
        " flush interval, 1 s by default).",
        unit="s",
        thresholds=[(None, "green"), (30, "orange"), (60, "red")],
    )
    L.panel(
        "Buffered deltas",
        [q(f"sum by (instance) (tollgate_quota_buffered_deltas{{{GW}}})", "{{instance}}")],
        description="Usage counters not yet flushed; grows while the store is down.",
        stack=True,
    )
    L.panel(
        "Replicas sharing the store",
        [q(f"max by (instance) (tollgate_quota_replicas{{{GW}}})", "{{instance}}")],
        description="Processes sharing the quota store, as each replica's last flush counted"
        " them; each admits about a limit / this before confirming with the store. Replicas"
        " that disagree for more than a flush interval are not all reaching the store.",
    )
    L.panel(
        "Flush errors",
        [
            q(
                f"sum by (instance) (rate(tollgate_quota_flush_errors_total{{{GW}}}[{RATE}]))",
                "{{instance}}",
            )
        ],
        description="Failed flushes per second (usage stays buffered and is retried).",
        unit="ops",
    )

    L.row("Configuration and lifecycle")
    L.panel(
        "Config reloads",
        [
            q(
                f"sum by (result) (increase(tollgate_config_reloads_total{{{GW}}}[{RATE}]))",
                "{{result}}",
            )
        ],
        description="Reloads of the configuration document; a failed one keeps the last"
        " good document.",
        stack=True,
    )
    L.panel(
        "Loaded config version",
        [q(f"count by (version) (tollgate_config_info{{{GW}}})", "{{version}}")],
        description="Replicas per configuration version (content hash); more than one"
        " version for long means a replica did not pick up a change.",
        stack=True,
    )
    L.panel(
        "Last document valid",
        [q(f"min by (instance) (tollgate_config_last_reload_ok{{{GW}}})", "{{instance}}")],
        description="0 while a rejected configuration document is pending on a replica"
        " (it keeps the last good one): new keys and revocations are not in effect.",
    )
    L.panel(
        "Keys configured",
        [q(f"max by (instance) (tollgate_config_keys{{{GW}}})", "{{instance}}")],
        description="Keys in the configuration each replica uses.",
    )
    L.panel(
        "Draining",
        [q(f"max by (instance) (tollgate_draining{{{GW}}})", "{{instance}}")],
        description="1 after SIGTERM while the replica drains in-flight requests.",
        kind="state-timeline",
        thresholds=[(None, "green"), (1, "orange")],
        mappings=[
            {"type": "value", "options": {"0": {"text": "serving"}, "1": {"text": "draining"}}}
        ],
    )
    L.panel(
        "Gateway version",
        [q(f"count by (version) (tollgate_build_info{{{GW}}})", "{{version}}")],
        description="Replicas per gateway version.",
        stack=True,
    )
    L.panel(
        "Gateway CPU",
        [
            q(
                f"sum by (instance) (rate(process_cpu_seconds_total{{{GW}}}[{RATE}]))",
                "{{instance}}",
            )
        ],
        description="CPU cores used per replica (the upstream client and JSON are most of it).",
        w=4,
    )
    L.panel(
        "Gateway memory",
        [q(f"sum by (instance) (process_resident_memory_bytes{{{GW}}})", "{{instance}}")],
        description="Resident memory per replica.",
        unit="bytes",
        w=4,
    )

    L.row("GPUs")
    L.panel(
        "GPU utilization",
        [q(f"gpu_utilization_percent{{{GPU}}}", "{{node}}/{{gpu}}")],
        description="SM utilization per GPU.",
        unit="percent",
        minimum=0,
        maximum=100,
    )
    L.panel(
        "GPU memory used",
        [q(f"gpu_memory_used_bytes{{{GPU}}}", "{{node}}/{{gpu}}")],
        description="Framebuffer memory used per GPU.",
        unit="bytes",
        minimum=0,
    )
    L.panel(
        "GPU memory free",
        [q(f"gpu_memory_free_bytes{{{GPU}}}", "{{node}}/{{gpu}}")],
        description="Framebuffer memory free per GPU (vLLM preallocates most of it).",
        unit="bytes",
        minimum=0,
    )
    L.panel(
        "GPU temperature",
        [
            q(f"gpu_temperature_celsius{{{GPU}}}", "{{node}}/{{gpu}} core"),
            q(f"gpu_memory_temperature_celsius{{{GPU}}}", "{{node}}/{{gpu}} memory"),
        ],
        description="Core and HBM temperature per GPU.",
        unit="celsius",
        thresholds=[(None, "green"), (80, "orange"), (85, "red")],
    )
    L.panel(
        "GPU power",
        [
            q(f"gpu_power_watts{{{GPU}}}", "{{node}}/{{gpu}}"),
            q(f"gpu_power_limit_watts{{{GPU}}}", "{{node}}/{{gpu}} limit"),
        ],
        description="Board power draw and the enforced power limit per GPU.",
        unit="watt",
        minimum=0,
    )
    L.panel(
        "GPU clocks",
        [
            q(f"gpu_sm_clock_hertz{{{GPU}}}", "{{node}}/{{gpu}} SM"),
            q(f"gpu_memory_clock_hertz{{{GPU}}}", "{{node}}/{{gpu}} memory"),
        ],
        description="SM and memory clocks per GPU.",
        unit="hertz",
    )
    L.panel(
        "GPU throttle reasons",
        [q(f"gpu_clock_event_active{{{GPU}}} == 1", "{{node}}/{{gpu}} {{reason}}")],
        description="Clock-event (throttle) reasons holding clocks down now, per GPU;"
        " gpu_idle is normal on an idle GPU.",
        kind="state-timeline",
    )
    L.panel(
        "GPU XID errors",
        [
            q(
                f"sum by (node, gpu, xid) (increase(gpu_xid_errors_total{{{GPU}}}[{RATE}]))",
                "{{node}}/{{gpu}} xid {{xid}}",
            )
        ],
        description="XID critical errors by code (48, 63, 64, 74, 79, 94, 95 … point at"
        " hardware; 13, 31, 43 usually at the application).",
        stack=True,
    )
    L.panel(
        "GPU ECC errors",
        [
            q(
                "sum by (node, gpu, type) (increase("
                f'gpu_ecc_errors_total{{{GPU}, scope="volatile"}}[{RATE}]))',
                "{{node}}/{{gpu}} {{type}}",
            )
        ],
        description="Volatile ECC errors (since the last driver load) by type.",
        stack=True,
    )
    L.panel(
        "GPU exporter health",
        [
            q("min by (instance) (gpu_exporter_nvml_up)", "{{instance}} NVML up"),
            q(f"max by (node) (gpu_lost{{{GPU}}})", "{{node}} GPU lost"),
        ],
        description="NVML answering in each exporter (1; its own series carry no node label,"
        " so they are listed by instance) and GPUs fallen off the bus (1).",
        kind="state-timeline",
        thresholds=[(None, "red"), (1, "green")],
    )

    return {
        "uid": UID,
        "title": "tollgate",
        "description": "tollgate gateway (traffic, latency, tokens, limits, dependencies)"
        " and GPU exporter.",
        "tags": ["tollgate", "llm", "gpu"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "links": [],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "includeAll": False,
                    "multi": False,
                    "refresh": 1,
                    "regex": "",
                },
                variable("namespace", "Namespace", "label_values(tollgate_build_info, namespace)"),
                variable(
                    "job", "Job", 'label_values(tollgate_build_info{namespace=~"$namespace"}, job)'
                ),
                variable("model", "Model", f"label_values(tollgate_requests_total{{{GW}}}, model)"),
                variable("node", "GPU node", "label_values(gpu_info, node)"),
                variable("gpu", "GPU", 'label_values(gpu_info{node=~"$node"}, gpu)'),
            ]
        },
        "panels": [{"id": i, **p} for i, p in enumerate(L.panels, start=1)],
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
