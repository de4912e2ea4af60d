"""OpenTelemetry traces of the request path, exported over OTLP (gRPC or HTTP).

Only when `ENABLE_OTLP_TRACING=true`: otherwise `Gateway.tracing` is None and the request
path does nothing but test that. A request is one SERVER span (the client's `traceparent`
as its parent, when it sent one) with children in request order: `auth`, `limits`,
`upstream` (until the upstream's response headers; its context goes upstream as
`traceparent`, so vLLM's spans join the trace) and `response` (the body or the stream).
Spans are batched and exported in the background by the SDK's BatchSpanProcessor
(`OTEL_BSP_*` variables tune it); no prompt, completion or key is ever an attribute.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tollgate_gateway import __version__
from tollgate_gateway.endpoints import Endpoint
from tollgate_gateway.record import Phase, RequestRecord
from tollgate_gateway.settings import Settings

_propagator = TraceContextTextMapPropagator()
OTLP_GRPC_PORT = 4317
# gen_ai.provider.name: the upstream is vLLM (or a server speaking its API).
PROVIDER = "vllm"
_REQUEST_PARAMETERS = (
    ("max_tokens", "gen_ai.request.max_tokens"),
    ("max_completion_tokens", "gen_ai.request.max_tokens"),
    ("max_output_tokens", "gen_ai.request.max_tokens"),
    ("temperature", "gen_ai.request.temperature"),
    ("top_p", "gen_ai.request.top_p"),
    ("top_k", "gen_ai.request.top_k"),
    ("n", "gen_ai.request.choice.count"),
    ("seed", "gen_ai.request.seed"),
)


def otlp_exporter(settings: Settings) -> SpanExporter:
    """The exporter the settings ask for, over OTLP/gRPC or OTLP/HTTP (see `Settings`)."""
    endpoint = settings.otel_exporter_otlp_traces_endpoint
    as_is = endpoint is not None
    endpoint = endpoint or settings.otel_exporter_otlp_endpoint or settings.otlp_endpoint
    protocol = settings.otel_exporter_otlp_traces_protocol or settings.otel_exporter_otlp_protocol
    if protocol is None:
        protocol = "grpc" if urlsplit(endpoint).port == OTLP_GRPC_PORT else "http/protobuf"
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpanExporter,
        )

        return GrpcSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    url = endpoint.rstrip("/")
    if not as_is and not url.endswith("/v1/traces"):
        url += "/v1/traces"
    return OTLPSpanExporter(endpoint=url)


class Tracing:
    def __init__(self, service_name: str, exporter: SpanExporter) -> None:
        resource = Resource.create({"service.name": service_name, "service.version": __version__})
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("tollgate_gateway", __version__)

    def begin(self, endpoint: Endpoint, headers: Iterable[tuple[bytes, bytes]]) -> RequestTrace:
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in headers
            if name in (b"traceparent", b"tracestate")
        }
        parent = _propagator.extract(carrier) if carrier else None
        span = self.tracer.start_span(
            f"{endpoint.method} {endpoint.route}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": endpoint.method,
                "http.route": endpoint.route,
                "gen_ai.operation.name": endpoint.operation,
                "gen_ai.provider.name": PROVIDER,
            },
        )
        return RequestTrace(self.tracer, span, endpoint.method)

    def shutdown(self) -> None:
        self.provider.shutdown()


class RequestTrace:
    """One request's spans. `mark(name)` closes a child span covering the time since the
    previous mark, so steps are timed without wrapping the request path in contexts."""

    __slots__ = ("_context", "_last", "_method", "_tracer", "_upstream", "span")

    def __init__(self, tracer: trace.Tracer, span: Span, method: str) -> None:
        self._tracer = tracer
        self._method = method
        self.span = span
        self._context = trace.set_span_in_context(span)
        self._last = time.time_ns()
        self._upstream: Span | None = None

    def mark(self, name: str) -> None:
        now = time.time_ns()
        self._tracer.start_span(name, context=self._context, start_time=self._last).end(now)
        self._last = now

    def describe_request(self, fields: Mapping[str, Any]) -> None:
        """The request's GenAI parameters, from its body (never its prompt)."""
        for name, attribute in _REQUEST_PARAMETERS:
            value = fields.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.span.set_attribute(attribute, value)

    def start_upstream(self, url: str, headers: dict[str, str]) -> None:
        """Open the upstream client span and put its context in the outgoing headers."""
        self.mark("limits")
        self._upstream = self._tracer.start_span(
            "upstream",
            context=self._context,
            kind=SpanKind.CLIENT,
            attributes={"url.full": url, "http.request.method": self._method},
        )
        _propagator.inject(headers, trace.set_span_in_context(self._upstream))

    def end_upstream(self, status: int | None) -> None:
        if self._upstream is not None:
            if status is not None:
                self._upstream.set_attribute("http.response.status_code", status)
                if status >= 500:  # HTTP semantic conventions: a client span's 5xx
                    self._upstream.set_status(Status(StatusCode.ERROR))
            self._upstream.end()
            self._upstream = None
        self._last = time.time_ns()

    def end(self, ex: RequestRecord) -> None:
        if self._upstream is not None:  # the call failed before response headers
            self._upstream.set_status(Status(StatusCode.ERROR))
            self.end_upstream(None)
        if ex.phase is not Phase.RECEIVING:
            self.mark("response")
        span = self.span
        span.set_attribute("http.response.status_code", ex.status)
        span.set_attribute("tollgate.request_id", ex.request_id)
        span.set_attribute("tollgate.stream", ex.stream)
        if ex.key_name:
            span.set_attribute("tollgate.key", ex.key_name)
        if ex.model:
            span.set_attribute("gen_ai.request.model", ex.model)
        if ex.usage is not None:
            span.set_attribute("gen_ai.usage.input_tokens", ex.usage.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", ex.usage.completion_tokens)
        if ex.error:
            span.set_attribute("error.type", ex.error)
        # HTTP semantic conventions: a server span is an error for a 5xx only; a 4xx is
        # the client's, and a client that left (499) is not the server's failure either.
        if 500 <= ex.status <= 599:
            span.set_status(Status(StatusCode.ERROR, ex.error))
        span.end()
