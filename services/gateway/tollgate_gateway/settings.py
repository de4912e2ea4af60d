"""All of the gateway's configuration, in one typed place.

Values come from environment variables (and an optional `.env` file in the working
directory). The names of the Rust gateway that tollgate replaces are kept (`VLLM_URL`,
`GATEWAY_API_KEYS`, ...), so existing deployments keep working. Everything is validated
once at start; a bad value stops the process with one line per problem.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AnyHttpUrl, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Seconds = Annotated[float, Field(gt=0)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    # Where vLLM (or any OpenAI-compatible server) listens, and the key it expects.
    vllm_url: AnyHttpUrl = AnyHttpUrl("http://127.0.0.1:8000")
    vllm_api_key: str | None = None
    # Several replicas: a comma-separated list of URLs (instead of VLLM_URL), or a DNS
    # name (a headless Service) and port, `vllm.ns.svc.cluster.local:8000`, re-resolved.
    vllm_urls: Annotated[list[AnyHttpUrl], NoDecode] = []
    vllm_dns_name: str | None = Field(None, pattern=r"^[A-Za-z0-9.-]+:[0-9]{1,5}$")
    vllm_dns_refresh_seconds: Seconds = 5.0
    # The models each replica serves, as JSON {"http://host:port": ["model", ...]};
    # replicas not listed report theirs at /v1/models.
    vllm_upstream_models: dict[str, list[str]] = {}
    # Session affinity: off, `header` (GATEWAY_SESSION_HEADER) or `key` (the key's name).
    gateway_session_affinity: Literal["off", "header", "key"] = "off"
    gateway_session_header: str = "x-session-id"
    # How a replica is chosen: `p2c` (the less loaded of two at random, by this gateway's
    # own count) or `vllm` (every replica scored by its own vLLM /metrics, read every
    # `scrape` seconds, and by prefix-cache affinity: routing.py), with these weights.
    gateway_routing: Literal["p2c", "vllm"] = "p2c"
    gateway_routing_weights: str = "queue=2,kv=2,prefix=3,prefill=3,lora=1"
    gateway_routing_scrape_seconds: Seconds = 0.25
    # When set, /v1/models answers with this one model instead of asking the upstream.
    served_model_name: str | None = None

    gateway_host: str = "0.0.0.0"
    gateway_port: int = Field(8080, ge=0, le=65535)
    # Where /metrics is served: its own port (the client-facing one then has none), or,
    # unset, beside the API. Per-key labels are for operators, not clients.
    gateway_metrics_port: int | None = Field(None, ge=0, le=65535)
    # Worker processes sharing the client port: a number, or `auto` for the CPUs this
    # container may use. They share one view of the per-IP and per-key limits; more than
    # one needs GATEWAY_METRICS_PORT, where the pod's metrics are served for all of them.
    gateway_workers: int = Field(1, ge=1, le=64)
    # Request headers passed to the upstream besides the ones it needs (content type,
    # request id, trace context): comma-separated names, a trailing `*` matches a prefix.
    # Nothing else a client sends reaches vLLM: no credentials, cookies or addresses.
    gateway_forward_headers: Annotated[list[str], NoDecode] = []
    # Comma-separated client keys; `name:key` gives a key a name for logs and metrics.
    gateway_api_keys: Annotated[list[str], NoDecode] = []
    # The configuration document (keys by hash, policies), reloaded when it changes.
    gateway_config_file: str | None = None
    gateway_config_poll_seconds: Seconds = 0.25
    # In Kubernetes: also watch the config Secret (`namespace/name`) through the API, for
    # revocations within seconds; the mounted file stays the fallback.
    gateway_config_secret: str | None = Field(None, pattern=r"^[a-z0-9.-]+/[a-z0-9.-]+$")
    # The API server (default: the in-cluster address) and the service account's files.
    gateway_kube_api_url: str | None = None
    gateway_kube_token_file: str | None = None
    gateway_kube_ca_file: str | None = None
    # The policy of GATEWAY_API_KEYS keys; unset limits are unlimited.
    gateway_default_requests_per_minute: int | None = Field(None, ge=1)
    gateway_default_tokens_per_minute: int | None = Field(None, ge=1)
    gateway_default_tokens_per_day: int | None = Field(None, ge=1)
    gateway_default_max_concurrent_requests: int | None = Field(None, ge=1)

    # Per-IP rate limit (GCRA); 0 turns it off. X-Forwarded-For is believed only from
    # peers in these comma-separated CIDRs.
    gateway_ip_rate_per_second: float = Field(1000.0, ge=0)
    gateway_ip_burst: int = Field(2000, ge=1)
    gateway_trusted_proxies: Annotated[list[str], NoDecode] = []

    # The quota store: sqlite:///relative/path.db (embedded default) or postgresql://...
    database_url: str = "sqlite:///tollgate-usage.db"
    # Postgres schema for the gateway's tables (created if missing).
    quota_db_schema: str = Field("public", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    quota_flush_interval_seconds: Seconds = 1.0
    # When the store is down: admit on the last known totals (false) or refuse with 503.
    quota_fail_closed: bool = False
    # Within this fraction of a key's limit, admissions are confirmed against the shared
    # store (one round trip) instead of the last flushed view; 0 turns that off.
    quota_exact_margin: float = Field(0.3, ge=0, le=1)
    # Tokens reserved at admission for a request without max_tokens.
    quota_default_reserve_tokens: int = Field(1024, ge=0)

    # Ingress
    gateway_max_body_bytes: int = Field(8 * 1024 * 1024, gt=0)
    # Client connections: headers must arrive within `header`, a body within `body` of
    # its headers, an idle keep-alive connection is closed after `idle`; past
    # `max_connections` new connections get a 503, past `max_in_flight` new requests do
    # (shed at once, so what is admitted is served instead of everything timing out).
    gateway_header_timeout_seconds: Seconds = 10.0
    gateway_body_timeout_seconds: Seconds = 30.0
    gateway_idle_timeout_seconds: Seconds = 5.0
    gateway_max_connections: int = Field(10000, gt=0)
    gateway_max_in_flight: int = Field(8192, gt=0)
    # Graceful shutdown: after SIGTERM, /ready fails for `delay` seconds (so load balancers
    # stop sending), then new connections are refused and in-flight requests get `drain`
    # seconds to finish.
    gateway_shutdown_delay_seconds: float = Field(0.0, ge=0)
    gateway_drain_seconds: Seconds = 30.0

    # Upstream timeouts. A non-stream response arrives whole, so its first byte can take
    # as long as the whole generation; a stream must not go quiet for longer than `idle`.
    upstream_connect_timeout_seconds: Seconds = 5.0
    upstream_first_byte_timeout_seconds: Seconds = 600.0
    upstream_stream_idle_timeout_seconds: Seconds = 60.0
    # Requests of this gateway in flight on each replica at most (vLLM's max_num_seqs is
    # the natural value); past it on every replica of a model, requests wait in per-key
    # fair queues, at most `queue_timeout` (fairqueue.py). Unset: no limit, no queue.
    gateway_upstream_max_in_flight: int | None = Field(None, ge=1)
    gateway_queue_timeout_seconds: Seconds = 30.0
    # Keep-alive connections to each replica at most.
    upstream_max_connections: int = Field(1000, gt=0)
    upstream_health_interval_seconds: Seconds = 2.0

    # Circuit breaker: open after this many consecutive upstream failures, stay open
    # this long, then let one probe request through (half-open).
    breaker_failure_threshold: int = Field(5, gt=0)
    breaker_open_seconds: Seconds = 10.0

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # OpenTelemetry traces over OTLP. The endpoint: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (as
    # is), else OTEL_EXPORTER_OTLP_ENDPOINT or OTLP_ENDPOINT (a collector's base URL). The
    # protocol: OTEL_EXPORTER_OTLP_TRACES_PROTOCOL or OTEL_EXPORTER_OTLP_PROTOCOL, else gRPC
    # for an endpoint on port 4317 (the OTLP/gRPC port, e.g. Jaeger's) and HTTP otherwise.
    enable_otlp_tracing: bool = False
    otlp_endpoint: str = "http://localhost:4318"
    otel_exporter_otlp_endpoint: str | None = None
    otel_exporter_otlp_traces_endpoint: str | None = None
    otel_exporter_otlp_protocol: Literal["grpc", "http/protobuf"] | None = None
    otel_exporter_otlp_traces_protocol: Literal["grpc", "http/protobuf"] | None = None
    otel_service_name: str = "tollgate-gateway"

    @field_validator(
        "gateway_api_keys",
        "gateway_trusted_proxies",
        "vllm_urls",
        "gateway_forward_headers",
        mode="before",
    )
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("gateway_workers", mode="before")
    @classmethod
    def _auto_workers(cls, value: object) -> object:
        return available_cpus() if value == "auto" else value

    @model_validator(mode="after")
    def _workers_need_metrics_port(self) -> Settings:
        if self.gateway_workers > 1 and self.gateway_metrics_port is None:
            raise ValueError(
                f"GATEWAY_WORKERS={self.gateway_workers} needs GATEWAY_METRICS_PORT: the"
                " metrics of all the workers are served there"
            )
        return self

    @field_validator("gateway_routing_weights")
    @classmethod
    def _weights(cls, value: str) -> str:
        from tollgate_gateway.routing import Weights

        Weights.parse(value)  # ValueError says which part is wrong
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("gateway_forward_headers")
    @classmethod
    def _header_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9-]+\*?", name):
                raise ValueError(f"{name!r} is not a header name (or a prefix ending in *)")
        return [name.lower() for name in value]

    @field_validator("gateway_trusted_proxies")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)  # ValueError names the bad one
        return value

    @field_validator("database_url")
    @classmethod
    def _store_url(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "postgres://", "postgresql://")):
            raise ValueError("must start with sqlite:///, postgres:// or postgresql://")
        return value

    @property
    def upstream_bases(self) -> list[str]:
        """The configured replicas' base URLs (none when they come from DNS)."""
        if self.vllm_dns_name:
            return []
        urls = self.vllm_urls or [self.vllm_url]
        return [str(url).rstrip("/") for url in urls]


def available_cpus() -> int:
    """The CPUs this process may use: its affinity, and a cgroup v2 CPU quota (how a
    container's CPU limit arrives), whichever is smaller."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        return cpus
    if quota == "max":
        return cpus
    return max(1, min(cpus, math.ceil(int(quota) / int(period))))


# Values never echoed in an error message: they are secrets.
_SECRETS = {"GATEWAY_API_KEYS", "VLLM_API_KEY", "DATABASE_URL"}


class SettingsError(Exception):
    """Configuration that cannot start the gateway; the message names each bad variable."""


def load_settings(**overrides: object) -> Settings:
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            name = "_".join(str(part) for part in error["loc"]).upper()
            if not name:  # a rule across variables: its message names them
                lines.append(message)
                continue
            secret = any(name.startswith(s) for s in _SECRETS)
            shown = "" if secret else f" (got {error.get('input')!r})"
            lines.append(f"{name}: {message}{shown}")
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(lines)) from None
