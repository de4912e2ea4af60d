"""Benchmark: the core workload through one upstream and through a pool of four, in one
run (concurrency 32): balancing must cost next to nothing per request.

    .venv/bin/python bench/pool_bench.py
"""

from __future__ import annotations

import signal
import subprocess
import tempfile

import psutil
from gateway_bench import BIN, CHAT, free_port, gateway_process, measure, wait_http


def main() -> None:
    sims, ports = [], [free_port() for _ in range(4)]
    for port in ports:
        sims.append(
            subprocess.Popen(
                [str(BIN / "tollgate-sim"), "--port", str(port)], stdout=subprocess.DEVNULL
            )
        )
    for port in ports:
        wait_http(f"http://127.0.0.1:{port}/health")
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    tmp = tempfile.mkdtemp()
    variants = {"one upstream": {"VLLM_URL": urls[0]}, "pool of 4": {"VLLM_URLS": ",".join(urls)}}
    rows = []
    sim = psutil.Process(sims[0].pid)
    try:
        for name, extra in variants.items():
            env = {"DATABASE_URL": f"sqlite:///{tmp}/{len(rows)}.db", **extra}
            with gateway_process(env) as (url, gw):
                non_stream = measure(gw, sim, url, CHAT % (16, b""), False, 32, 12000)
                stream = measure(gw, sim, url, CHAT % (64, b',"stream":true'), True, 32, 6000)
            rows.append((name, non_stream, stream))
    finally:
        for sim_proc in sims:
            sim_proc.send_signal(signal.SIGTERM)
            sim_proc.wait(30)
    print(f"concurrency 32, {psutil.cpu_count()} cores\n")
    print(f"{'variant':<16}{'non-stream req/s':>18}{'CPU ms':>8}{'stream req/s':>14}{'CPU ms':>8}")
    for name, ns, st in rows:
        print(f"{name:<16}{ns.rps:>18.0f}{ns.cpu_target:>8.3f}{st.rps:>14.0f}{st.cpu_target:>8.3f}")
    (_, ns1, st1), (_, ns4, st4) = rows
    print(
        f"\npool / one: throughput {ns4.rps / ns1.rps:.2f} (non-stream),"
        f" {st4.rps / st1.rps:.2f} (stream); CPU per request"
        f" {ns4.cpu_target / ns1.cpu_target:.2f}, {st4.cpu_target / st1.cpu_target:.2f}"
    )


if __name__ == "__main__":
    main()
