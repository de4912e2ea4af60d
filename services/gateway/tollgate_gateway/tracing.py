"""OpenTelemetry traces of the request path, exported over OTLP/HTTP.

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
from collections.abc import Iterable

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tollgate_gateway import __version__
from tollgate_gateway.record import Phase, RequestRecord

_propagator = TraceContextTextMapPropagator()


class Tracing:
    def __init__(self, endpoint: str, exporter: SpanExporter | None = None) -> None:
        if exporter is None:
            url = endpoint.rstrip("/")
            exporter = OTLPSpanExporter(
                endpoint=url if url.endswith("/v1/traces") else url + "/v1/traces"
            )
        resource = Resource.create(
            {"service.name": "tollgate-gateway", "service.version": __version__}
        )
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("tollgate_gateway", __version__)

    def begin(self, route: str, headers: Iterable[tuple[bytes, bytes]]) -> RequestTrace:
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in headers
            if name in (b"traceparent", b"tracestate")
        }
        parent = _propagator.extract(carrier) if carrier else None
        span = self.tracer.start_span(
            f"POST {route}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": "POST", "http.route": route},
        )
        return RequestTrace(self.tracer, span)

    def shutdown(self) -> None:
        self.provider.shutdown()


class RequestTrace:
    """One request's spans. `mark(name)` closes a child span covering the time since the
    previous mark, so steps are timed without wrapping the request path in contexts."""

    __slots__ = ("_context", "_last", "_tracer", "_upstream", "span")

    def __init__(self, tracer: trace.Tracer, span: Span) -> None:
        self._tracer = tracer
        self.span = span
        self._context = trace.set_span_in_context(span)
        self._last = time.time_ns()
        self._upstream: Span | None = None

    def mark(self, name: str) -> None:
        now = time.time_ns()
        self._tracer.start_span(name, context=self._context, start_time=self._last).end(now)
        self._last = now

    def start_upstream(self, url: str, headers: dict[str, str]) -> None:
        """Open the upstream client span and put its context in the outgoing headers."""
        self.mark("limits")
        self._upstream = self._tracer.start_span(
            "upstream",
            context=self._context,
            kind=SpanKind.CLIENT,
            attributes={"url.full": url, "http.request.method": "POST"},
        )
        _propagator.inject(headers, trace.set_span_in_context(self._upstream))

    def end_upstream(self, status: int | None) -> None:
        if self._upstream is not None:
            if status is not None:
                self._upstream.set_attribute("http.response.status_code", status)
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
        if ex.status >= 500 or ex.error:
            span.set_status(Status(StatusCode.ERROR, ex.error))
        span.end()
