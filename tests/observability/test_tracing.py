"""Traces: with ENABLE_OTLP_TRACING the gateway exports a span tree over OTLP/HTTP or
OTLP/gRPC to a receiver on 127.0.0.1, joins the client's trace, passes its context
upstream, and follows the GenAI and HTTP semantic conventions."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from servers import KEY_A, free_port, wait_until

from tollgate_gateway.settings import load_settings
from tollgate_gateway.tracing import otlp_exporter

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class Receiver(ThreadingHTTPServer):
    def __init__(self, port: int) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.spans: list = []
        self.raw = b""


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        self.server.raw += body
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.server.spans.extend(scope_spans.spans)
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver(free_port())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def test_span_tree_reaches_an_otlp_receiver(make_sim, make_gateway, receiver) -> None:
    sim = make_sim()
    gw = make_gateway(
        sim.url,
        ENABLE_OTLP_TRACING="true",
        OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.server_port}",
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    body = {"model": "sim-llama", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3, "stream": True}  # fmt: skip
    headers = {
        "authorization": f"Bearer {KEY_A}",
        "traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01",
    }
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status_code == 200
        r.read()

    spans = wait_until(lambda: len(receiver.spans) >= 5 and receiver.spans, timeout=5)
    by_name = {s.name: s for s in spans}
    assert set(by_name) == {"POST /v1/chat/completions", "auth", "limits", "upstream", "response"}
    server = by_name["POST /v1/chat/completions"]
    assert all(s.trace_id.hex() == TRACE_ID for s in spans)  # joined the client's trace
    assert server.parent_span_id.hex() == CLIENT_SPAN
    for name in ("auth", "limits", "upstream", "response"):
        assert by_name[name].parent_span_id == server.span_id
    # Children in request order, inside the server span.
    order = sorted(("auth", "limits", "upstream", "response"),
                   key=lambda n: by_name[n].start_time_unix_nano)  # fmt: skip
    assert order == ["auth", "limits", "upstream", "response"]
    assert server.start_time_unix_nano <= by_name["auth"].start_time_unix_nano
    assert by_name["response"].end_time_unix_nano <= server.end_time_unix_nano
    attrs = {a.key: a.value for a in server.attributes}
    assert attrs["gen_ai.operation.name"].string_value == "chat"
    assert attrs["gen_ai.provider.name"].string_value == "vllm"
    assert attrs["gen_ai.request.max_tokens"].int_value == 3
    assert attrs["gen_ai.request.model"].string_value == "sim-llama"
    assert attrs["gen_ai.usage.output_tokens"].int_value == 3
    assert attrs["tollgate.key"].string_value == "team-a"
    assert attrs["http.response.status_code"].int_value == 200
    # The upstream received the upstream span's context.
    upstream = by_name["upstream"]
    sent = sim.stats()["last_headers"]["traceparent"]
    assert sent == f"00-{TRACE_ID}-{upstream.span_id.hex()}-01"
    assert KEY_A.encode() not in receiver.raw


def test_no_tracing_leaves_traceparent_untouched(make_sim, make_gateway) -> None:
    sim = make_sim()
    gw = make_gateway(sim.url)
    parent = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
    httpx.post(
        gw.url + "/v1/completions",
        json={"prompt": "x", "max_tokens": 1},
        headers={"authorization": f"Bearer {KEY_A}", "traceparent": parent},
    )
    assert sim.stats()["last_headers"]["traceparent"] == parent


class GrpcReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []

    def Export(self, request, context):
        self.requests.append(request)
        return ExportTraceServiceResponse()


def test_grpc_export_service_name_and_http_status_conventions(make_sim, make_gateway) -> None:
    receiver = GrpcReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        sim = make_sim()
        gw = make_gateway(
            sim.url,
            ENABLE_OTLP_TRACING="true",
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
            OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
            OTEL_SERVICE_NAME="front-door",
            OTEL_BSP_SCHEDULE_DELAY="100",
        )
        body = {"model": "sim-llama", "input": "one two"}
        ok = httpx.post(gw.url + "/v1/embeddings", json=body,
                        headers={"authorization": f"Bearer {KEY_A}"})  # fmt: skip
        assert ok.status_code == 200
        assert httpx.post(gw.url + "/v1/embeddings", json=body).status_code == 401

        def servers() -> list:
            found = []
            for request in receiver.requests:
                for resource_spans in request.resource_spans:
                    names = [a.value.string_value for a in resource_spans.resource.attributes
                             if a.key == "service.name"]  # fmt: skip
                    for scope_spans in resource_spans.scope_spans:
                        found += [(names, s) for s in scope_spans.spans if s.kind == 2]
            return found if len(found) >= 2 else []

        spans = gw.wait_for(servers, "two server spans at the gRPC receiver")
        assert all(names == ["front-door"] for names, _ in spans)
        by_status = {
            {a.key: a.value for a in s.attributes}["http.response.status_code"].int_value: s
            for _, s in spans
        }
        embedded = {a.key: a.value for a in by_status[200].attributes}
        assert embedded["gen_ai.operation.name"].string_value == "embeddings"
        assert embedded["gen_ai.usage.input_tokens"].int_value == 2
        # A 4xx is the client's error: the server span is not marked as failed.
        assert by_status[401].status.code != 2  # STATUS_CODE_ERROR
    finally:
        server.stop(None)


def test_the_otlp_grpc_port_means_grpc(monkeypatch) -> None:
    monkeypatch.setenv("OTLP_ENDPOINT", "http://localhost:4317")
    assert "grpc" in type(otlp_exporter(load_settings())).__module__
    monkeypatch.setenv("OTLP_ENDPOINT", "http://localhost:4318")
    assert "http" in type(otlp_exporter(load_settings())).__module__
