"""Benchmark: the upstream HTTP client alone — aiohttp as upstream.py configures it against
h1client (and a few extra rows) — driving the simulator, in one run.

The gateway's upstream client is a large share of its CPU; this isolates it. One process
runs the simulator; this process sends the requests and reads its own CPU time
(`time.process_time`, all threads: a Rust client's runtime threads count too) per request,
and the simulator's for context. The clients take turns, round after round, so a change in
the machine's speed hits all of them alike; the table shows each cell's median round and the
ratios to aiohttp within this run.

    .venv/bin/python bench/client_bench.py [--quick] [--rounds 3] [--loop uvloop|asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import psutil
from multidict import CIMultiDict
from yarl import URL

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "services" / "gateway"))
from gateway_bench import BIN, CHAT, free_port, wait_http

from tollgate_gateway import h1client

TARGET = "/v1/chat/completions"
# What the gateway forwards for a typical request (its own headers plus the client's).
HEADERS = {
    "content-type": "application/json",
    "authorization": "Bearer sk-upstream",
    "x-request-id": "0123456789abcdef0123456789abcdef",
}
WORKLOADS = [
    ("non-stream 16 tok", CHAT % (16, b""), False),
    ("stream 64 tok", CHAT % (64, b',"stream":true'), True),
]


class Client(Protocol):
    async def one(self, body: bytes, stream: bool) -> int: ...

    async def close(self) -> None: ...


class AiohttpClient:
    """aiohttp as upstream.py sets it up: one session, a pooled TCPConnector, no auto
    headers, no decompression, a shared ClientTimeout, a pre-built encoded URL."""

    def __init__(self, base: str, timeouts: bool = True, reuse_headers: bool = False) -> None:
        connector = aiohttp.TCPConnector(limit=100, keepalive_timeout=4.0, ttl_dns_cache=10)
        self.session = aiohttp.ClientSession(
            connector=connector,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            auto_decompress=False,
        )
        self.url = URL(base + TARGET, encoded=True)
        # Reused: a CIMultiDict built once (the gateway's headers differ per request, so
        # this row only shows what aiohttp's header handling costs).
        self.headers: CIMultiDict[str] | None = CIMultiDict(HEADERS) if reuse_headers else None
        self.full = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=10, sock_read=60 if timeouts else None
        )
        self.stream = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=10, sock_read=60 if timeouts else None
        )

    async def one(self, body: bytes, stream: bool) -> int:
        response = await self.session.request(
            "POST",
            self.url,
            data=body,
            headers=self.headers if self.headers is not None else dict(HEADERS),
            timeout=self.stream if stream else self.full,
        )
        size = 0
        if stream:
            content = response.content
            while data := await content.readany():
                size += len(data)
        else:
            size = len(await response.read())
        response.release()
        return size

    async def close(self) -> None:
        await self.session.close()


class H1Client:
    """h1client as the adapter would use it: the head built per request from the same
    headers dict, read timeouts armed."""

    def __init__(self, base: str) -> None:
        self.pool = h1client.Client(limit=100, keepalive=4.0).pool(base)

    async def one(self, body: bytes, stream: bool) -> int:
        pool = self.pool
        head = pool.head("POST", TARGET, dict(HEADERS), len(body))
        response = await pool.request(head, body, connect_timeout=10, read_timeout=60)
        size = 0
        if stream:

            def take(data: bytes) -> bool:
                nonlocal size
                size += len(data)
                return True

            await response.pump(take)
        else:
            size = len(await response.read())
        response.release()
        return size

    async def close(self) -> None:
        await self.pool.close()


class PyreqwestClient:
    """pyreqwest (Rust reqwest + tokio, on its own threads), if installed."""

    def __init__(self, base: str) -> None:
        from datetime import timedelta

        from pyreqwest.client import ClientBuilder

        self.client = ClientBuilder().build()
        self.url = base + TARGET
        self.timeout = timedelta(seconds=60)

    async def one(self, body: bytes, stream: bool) -> int:
        builder = self.client.post(self.url).headers(dict(HEADERS)).body_bytes(body)
        size = 0
        if stream:
            async with builder.build_streamed() as response:
                reader = response.body_reader
                while (data := await reader.read_chunk()) is not None:
                    size += len(data)
        else:
            response = await builder.build().send()
            size = len(await response.bytes())
        return size

    async def close(self) -> None:
        await self.client.close()


def variants() -> dict[str, Callable[[str], Client]]:
    found: dict[str, Callable[[str], Client]] = {
        "aiohttp": AiohttpClient,
        "h1client": H1Client,
        "aiohttp, no read timeout": lambda base: AiohttpClient(base, timeouts=False),
        "aiohttp, headers reused": lambda base: AiohttpClient(base, reuse_headers=True),
    }
    try:
        import pyreqwest  # noqa: F401

        found["pyreqwest"] = PyreqwestClient
    except ImportError:
        pass
    return found


@dataclass
class Sample:
    cpu_us: float  # this process's CPU per request
    rps: float
    sim_cpu_us: float


def sim_cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


async def drive(
    client: Client, body: bytes, stream: bool, concurrency: int, n: int, sim: psutil.Process
) -> Sample:
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            if await client.one(body, stream) < 10:
                raise SystemExit("short answer")

    sim_before = sim_cpu(sim)
    cpu = time.process_time()
    wall = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu
    return Sample(cpu / n * 1e6, n / wall, (sim_cpu(sim) - sim_before) / n * 1e6)


async def bench(base: str, sim: psutil.Process, rounds: int, scale: float) -> None:
    makers = variants()
    clients = {name: make(base) for name, make in makers.items()}
    cells = [(w, c) for w in WORKLOADS for c in (1, 32)]
    results: dict[tuple[str, int, str], list[Sample]] = {}
    try:
        for client in clients.values():  # warm up: connections, caches
            for _, body, stream in WORKLOADS:
                await drive(client, body, stream, 32, 200, sim)
        for r in range(rounds):
            order = list(clients.items())
            if r % 2:
                order.reverse()
            for (label, body, stream), concurrency in cells:
                n = int((1500 if stream else 3000) * scale)
                for name, client in order:
                    sample = await drive(client, body, stream, concurrency, n, sim)
                    results.setdefault((label, concurrency, name), []).append(sample)
            print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    finally:
        for client in clients.values():
            await client.close()
    report(results, list(clients), cells)


def report(
    results: dict[tuple[str, int, str], list[Sample]],
    names: list[str],
    cells: list[tuple[tuple[str, bytes, bool], int]],
) -> None:
    print(f"\n{psutil.cpu_count()} cores; medians of the rounds; CPU = this process's µs/request")
    print(
        f"{'workload':<18}{'conc':>5}  {'client':<26}{'CPU µs/req':>11}{'req/s':>9}"
        f"{'CPU vs aiohttp':>16}{'req/s vs aiohttp':>18}{'sim CPU µs/req':>16}"
    )
    for (label, _, _), concurrency in cells:
        base = results[(label, concurrency, "aiohttp")]
        base_cpu = statistics.median(s.cpu_us for s in base)
        base_rps = statistics.median(s.rps for s in base)
        for name in names:
            samples = results[(label, concurrency, name)]
            cpu = statistics.median(s.cpu_us for s in samples)
            rps = statistics.median(s.rps for s in samples)
            sim_us = statistics.median(s.sim_cpu_us for s in samples)
            print(
                f"{label:<18}{concurrency:>5}  {name:<26}{cpu:>11.0f}{rps:>9.0f}"
                f"{cpu / base_cpu:>16.2f}{rps / base_rps:>18.2f}{sim_us:>16.0f}"
            )
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fifth of the requests")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args()
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "tollgate-sim"), "--port", str(port)], stdout=subprocess.DEVNULL
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        coro = bench(
            f"http://127.0.0.1:{port}",
            psutil.Process(proc.pid),
            args.rounds,
            0.2 if args.quick else 1.0,
        )
        runner: Any
        if args.loop == "uvloop":
            import uvloop

            runner = uvloop.run
        else:
            runner = asyncio.run
        print(f"event loop: {args.loop}")
        runner(coro)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
