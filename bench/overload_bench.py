"""Benchmark: a burst of streams much larger than the gateway can open at once.

`--streams` streams (default 9,900: about the most one process may hold here, at two
descriptors a stream and ~20,000 files a process) are started over `--ramp` seconds
against one gateway in front of one simulator; each streams `--tokens` tokens
`--itl-ms` apart. Prints the goodput (streams that ended with `[DONE]`), the errors by
code, how many streams the gateway shed at once (503 `gateway_overloaded`), and whether
the upstream's circuit breaker opened (it must not: the upstream never failed).

    .venv/bin/python bench/overload_bench.py [--streams 9900] [--ramp 2]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import resource
import subprocess
import time

import aiohttp
import httpx
from gateway_bench import BIN, KEY, free_port, gateway_process, wait_http


async def burst(url: str, streams: int, ramp: float, tokens: int, itl_ms: int) -> dict:
    results: collections.Counter[str] = collections.Counter()
    body = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens, "stream": True}
    )
    headers = {
        "authorization": f"Bearer {KEY}",
        "content-type": "application/json",
        "x-sim-itl-ms": str(itl_ms),
    }
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one() -> None:
            try:
                async with session.post(url, data=body, headers=headers) as r:
                    data = await r.read()
                    if r.status != 200:
                        results[f"{r.status} {json.loads(data)['error']['code']}"] += 1
                    elif data.endswith(b"data: [DONE]\n\n"):
                        results["done"] += 1
                    else:
                        results["200 incomplete"] += 1
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                results[type(exc).__name__] += 1

        tasks = []
        started = time.monotonic()
        for i in range(streams):
            due = started + ramp * i / streams
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
        results["seconds"] = round(time.monotonic() - started)
    return dict(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=9900)
    parser.add_argument("--ramp", type=float, default=2.0)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--itl-ms", type=int, default=100)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    port = free_port()
    sim = subprocess.Popen(
        [str(BIN / "tollgate-sim"), "--port", str(port)], stdout=subprocess.DEVNULL
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        env = {"VLLM_URL": f"http://127.0.0.1:{port}", "DATABASE_URL": "sqlite:///:memory:"}
        with gateway_process(env) as (url, _proc):
            results = asyncio.run(burst(url, args.streams, args.ramp, args.tokens, args.itl_ms))
            metrics = httpx.get(url.rsplit("/v1/", 1)[0] + "/metrics").text
        opened = [
            line
            for line in metrics.splitlines()
            if line.startswith("tollgate_circuit_breaker_transitions_total{")
            and 'to_state="open"' in line
        ]
        print(json.dumps({**results, "breaker_opened": opened}, indent=1))
    finally:
        sim.terminate()
        sim.wait(10)


if __name__ == "__main__":
    main()
