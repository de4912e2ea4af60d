"""Benchmark: the core workload with limits off, and with quotas on and Postgres as the
shared store, in one run, against one simulator.

"Quotas on": a policy with every limit (requests and tokens per minute, tokens per day,
concurrency) set high enough never to refuse, so every check runs on every request, the
per-IP limit on, usage flushed to Postgres every second. Prints throughput and gateway CPU
per request for both, their ratio, and the Postgres statements per second the gateway
caused (from pg_stat_database: each flush is one statement, one transaction).

    .venv/bin/python bench/quota_bench.py [--database-url postgresql://...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import psutil
from gateway_bench import BIN, CHAT, KEY, free_port, gateway_process, measure, wait_http

from tollgate_contract.keys import key_hash


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
    args = parser.parse_args()
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    tmp = Path(tempfile.mkdtemp())
    config = tmp / "config.json"
    big = 10**12
    config.write_text(
        json.dumps(
            {
                "apiVersion": "tollgate.dev/v1alpha1",
                "kind": "GatewayConfig",
                "policies": {
                    "all-limits": {
                        "requestsPerMinute": big,
                        "tokensPerMinute": big,
                        "tokensPerDay": big,
                        "maxConcurrentRequests": 10000,
                    }
                },
                "keys": {key_hash(KEY): {"name": "bench", "policy": "all-limits"}},
            }
        )
    )
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
        "quotas on (Postgres, every limit, IP limit)": {
            "GATEWAY_CONFIG_FILE": str(config),
            "DATABASE_URL": args.database_url,
            "QUOTA_DB_SCHEMA": schema,
            "GATEWAY_API_KEYS": "",
        },
    }
    sim_proc = psutil.Process(sim.pid)
    results = {}
    try:
        for name, env in variants.items():
            with gateway_process({**base_env, **env}) as (url, gw_proc):
                rows = []
                for label, body, stream, n in (
                    ("non-stream 16 tok", CHAT % (16, b""), False, args.requests),
                    ("stream 64 tok", CHAT % (64, b',"stream":true'), True, args.requests // 2),
                ):
                    commits = asyncio.run(_commits(args.database_url))
                    started = time.monotonic()
                    result = measure(gw_proc, sim_proc, url, body, stream, 32, n)
                    elapsed = time.monotonic() - started
                    statements = asyncio.run(_commits(args.database_url)) - commits - 1
                    rows.append((label, result, statements / elapsed))
            results[name] = rows
    finally:
        sim.send_signal(signal.SIGTERM)
        sim.wait(30)
        asyncio.run(_drop(args.database_url, schema))

    print(f"concurrency 32, {args.requests} requests (streams: half), {psutil.cpu_count()} cores\n")
    print(f"{'variant':<46}{'workload':<20}{'req/s':>8}{'CPU ms/req':>12}{'PG stmt/s':>11}")
    for name, rows in results.items():
        for label, result, rate in rows:
            shown = f"{rate:>11.1f}" if "Postgres" in name else f"{'-':>11}"
            print(f"{name:<46}{label:<20}{result.rps:>8.0f}{result.cpu_target:>12.3f}{shown}")
    off, on = results.values()
    for (label, r_off, _), (_, r_on, _) in zip(off, on, strict=True):
        print(
            f"quotas on / off, {label}: throughput {r_on.rps / r_off.rps:.2f},"
            f" CPU {r_on.cpu_target / r_off.cpu_target:.2f}"
        )
    print("\nPG stmt/s: transactions committed in the database during the run (the flush")
    print("is one statement per second per replica; warm-up and other clients included).")


async def _drop(url: str, schema: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


if __name__ == "__main__":
    main()
