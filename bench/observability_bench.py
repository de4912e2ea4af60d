"""Benchmark: what logs, metrics and tracing cost, in one run.

Three gateways against one simulator, concurrency 32, the core workloads:
- "default": request logs and metrics on (what ships),
- "logs off": `LOG_LEVEL=WARNING` (no request lines),
- "tracing on": `ENABLE_OTLP_TRACING=true`, exporting to a local OTLP sink that answers 200.
Metrics cannot be switched off (they are always on), so their share is measured directly:
the CPU time of one `GatewayMetrics.observe` call, against the gateway's CPU per request.

    .venv/bin/python bench/observability_bench.py
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import tempfile
import time
import timeit

import psutil
from gateway_bench import BIN, CHAT, free_port, gateway_process, measure, wait_http

from tollgate_gateway.app import Gateway
from tollgate_gateway.podshare import PodShare
from tollgate_gateway.record import RequestRecord
from tollgate_gateway.settings import load_settings
from tollgate_gateway.usage import Usage


async def _sink(port: int) -> None:
    """An OTLP/HTTP endpoint that accepts everything: the exporter's cost, not a backend's."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await serve(reader, writer)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def observe_cost_us() -> float:
    """Microseconds of CPU for the metrics of one finished request."""
    with tempfile.TemporaryDirectory() as tmp:
        gateway = Gateway(load_settings(database_url=f"sqlite:///{tmp}/x.db"), PodShare(1))
        ex = RequestRecord(
            route="/v1/chat/completions", operation="chat", started=time.perf_counter()
        )
        ex.key_name, ex.model, ex.status, ex.stream = "bench", "sim-llama", 200, True
        ex.upstream_status, ex.upstream_seconds, ex.ttft_seconds = 200, 0.01, 0.002
        ex.usage = Usage(12, 64)
        n = 50_000
        seconds = timeit.timeit(lambda: gateway.metrics.observe(ex, 0.02), number=n)
    return seconds / n * 1e6


def main() -> None:
    sink_port, sim_port = free_port(), free_port()
    sink = subprocess.Popen(
        [str(BIN / "python"), "-c", f"import asyncio, observability_bench as b; "
         f"asyncio.run(b._sink({sink_port}))"],
        cwd=os.path.dirname(__file__),
    )  # fmt: skip
    sim = subprocess.Popen(
        [str(BIN / "tollgate-sim"), "--port", str(sim_port)], stdout=subprocess.DEVNULL
    )
    wait_http(f"http://127.0.0.1:{sim_port}/health")
    tmp = tempfile.mkdtemp()
    variants = {
        "default (logs + metrics)": {},
        "logs off": {"LOG_LEVEL": "WARNING"},
        "tracing on": {
            "ENABLE_OTLP_TRACING": "true",
            "OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
        },
    }
    rows = []
    sim_proc = psutil.Process(sim.pid)
    try:
        for name, extra in variants.items():
            env = {
                "VLLM_URL": f"http://127.0.0.1:{sim_port}",
                "DATABASE_URL": f"sqlite:///{tmp}/{len(rows)}.db",
                **extra,
            }
            with gateway_process(env) as (url, gw):
                non_stream = measure(gw, sim_proc, url, CHAT % (16, b""), False, 32, 12000)
                stream = measure(gw, sim_proc, url, CHAT % (64, b',"stream":true'), True, 32, 6000)
            rows.append((name, non_stream, stream))
    finally:
        for proc in (sim, sink):
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)

    print(f"concurrency 32, {psutil.cpu_count()} cores\n")
    print(f"{'variant':<28}{'non-stream req/s':>18}{'CPU ms':>8}{'stream req/s':>14}{'CPU ms':>8}")
    for name, ns, st in rows:
        print(f"{name:<28}{ns.rps:>18.0f}{ns.cpu_target:>8.3f}{st.rps:>14.0f}{st.cpu_target:>8.3f}")
    base = rows[0]
    for name, ns, st in rows[1:]:
        print(
            f"default / {name}: throughput {base[1].rps / ns.rps:.2f} (non-stream),"
            f" {base[2].rps / st.rps:.2f} (stream)"
        )
    cost = observe_cost_us()
    share = cost / (base[1].cpu_target * 1000) * 100
    print(f"\nmetrics per request: {cost:.1f} us of CPU = {share:.1f} % of a non-stream request")


if __name__ == "__main__":
    main()
