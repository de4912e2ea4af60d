"""Benchmark: the core workload with limits off, with every limit on (SQLite), and with
quotas on and Postgres as the shared store, in one run, against one simulator.

"Quotas on": a policy with every limit (requests and tokens per minute, tokens per day,
concurrency) set high enough never to refuse, so every check runs on every request, the
per-IP limit on, usage flushed to Postgres every second. "Limits on" is the same on
SQLite, which no other replica shares: the two differ by the shared store's own cost. The
gateways run at once and serve bursts in turn, round after round (the machine's drift
between two runs one after the other was larger than the difference). Prints throughput
and gateway CPU per request for each (medians over the rounds), each one's ratio to
limits off and the CPU it adds per request, and the Postgres statements per second the
gateway caused (from pg_stat_database: each flush is one statement, one transaction).

    .venv/bin/python bench/quota_bench.py [--database-url postgresql://...] [--rounds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import psutil
from gateway_bench import BIN, CHAT, free_port, gateway_process, limits_env, measure, wait_http


async def _commits(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        )
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument("--requests", type=int, default=12000)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    tmp = Path(tempfile.mkdtemp())
    limits = limits_env(tmp)
    sim_port = free_port()
    sim = subprocess.Popen(
        [str(BIN / "tollgate-sim"), "--port", str(sim_port)], stdout=subprocess.DEVNULL
    )
    wait_http(f"http://127.0.0.1:{sim_port}/health")
    base_env = {"VLLM_URL": f"http://127.0.0.1:{sim_port}"}
    variants = {
        "limits off (SQLite, no policy, no IP limit)": {
            "GATEWAY_IP_RATE_PER_SECOND": "0",
            "DATABASE_URL": f"sqlite:///{tmp}/usage.db",
        },
        "limits on (SQLite, every limit, IP limit)": {
            **limits,
            "DATABASE_URL": f"sqlite:///{tmp}/usage-limits.db",
        },
        "quotas on (Postgres, every limit, IP limit)": {
            **limits,
            "DATABASE_URL": args.database_url,
            "QUOTA_DB_SCHEMA": schema,
        },
    }
    sim_proc = psutil.Process(sim.pid)
    workloads = (
        ("non-stream 16 tok", CHAT % (16, b""), False, args.requests),
        ("stream 64 tok", CHAT % (64, b',"stream":true'), True, args.requests // 2),
    )
    # Both gateways run at once and serve bursts in turn (the order swapped each round),
    # so the machine's drift, larger than the difference measured, hits both alike.
    cpu: dict[tuple[str, str], list[float]] = {}
    rps: dict[tuple[str, str], list[float]] = {}
    statements, seconds = 0, 0.0
    try:
        with contextlib.ExitStack() as stack:
            gateways = {
                name: stack.enter_context(gateway_process({**base_env, **env}))
                for name, env in variants.items()
            }
            for label, body, stream, n in workloads:
                for round_ in range(args.rounds):
                    order = list(gateways) if round_ % 2 == 0 else list(gateways)[::-1]
                    for name in order:
                        url, gw_proc = gateways[name]
                        commits = asyncio.run(_commits(args.database_url))
                        started = time.monotonic()
                        result = measure(gw_proc, sim_proc, url, body, stream, 32, n // args.rounds)
                        if "Postgres" in name:
                            seconds += time.monotonic() - started
                            statements += asyncio.run(_commits(args.database_url)) - commits - 1
                        cpu.setdefault((name, label), []).append(result.cpu_target)
                        rps.setdefault((name, label), []).append(result.rps)
    finally:
        sim.send_signal(signal.SIGTERM)
        sim.wait(30)
        asyncio.run(_drop(args.database_url, schema))

    print(
        f"concurrency 32, {args.requests} requests (streams: half) in {args.rounds} rounds,"
        f" {psutil.cpu_count()} cores; medians over the rounds\n"
    )
    print(f"{'variant':<46}{'workload':<20}{'req/s':>8}{'CPU ms/req':>12}")
    for (name, label), values in cpu.items():
        median_rps = statistics.median(rps[name, label])
        print(f"{name:<46}{label:<20}{median_rps:>8.0f}{statistics.median(values):>12.3f}")
    off, *others = variants
    for label, *_ in workloads:
        before = cpu[off, label]
        for name in others:
            after = cpu[name, label]
            lower = sum(a <= b for a, b in zip(after, before, strict=True))
            ratio = statistics.median(after) / statistics.median(before)
            added = (statistics.median(after) - statistics.median(before)) * 1000
            print(
                f"{name.split(' (')[0]} / off, {label}: CPU {ratio:.3f}, {added:+.1f} µs/req"
                f" (used no more in {lower} of {args.rounds} rounds)"
            )
    print(f"Postgres statements/s while the quotas-on gateway served: {statements / seconds:.1f}")
    print("(transactions committed in the database: the flush is one statement per second")
    print("per replica; warm-up and other clients included)")


async def _drop(url: str, schema: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


if __name__ == "__main__":
    main()
