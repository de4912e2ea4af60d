"""Benchmark: the same workload direct to the simulator, through nginx and through the
gateway, in one run.

Workloads: 16-token chats; 64-token streams as fast as the simulator writes them (a few
reads each: the per-request cost); and 64-token streams at 5 ms a token (a read per
token, as from a real model: the per-chunk cost). Prints, per workload and concurrency:
throughput, p50/p99 latency (time to first byte for streams), CPU milliseconds per
request of the process under test (read from its own CPU time, so the figure does not
depend on the simulator's speed), the simulator's CPU per request (it must stay far below
the gateway's), the gateway's RSS, the median `x-tollgate-overhead-ms`, and the ratios to
direct and to nginx (a plain reverse proxy, one worker, keep-alive upstream, buffering
off: the floor a proxy can reach here; `nginx-light` is installed with apt-get when
missing, and the row is left out if it cannot be). Also the gateway's idle RSS and its
start-to-ready time. Every feature is on: the bench key is under a policy of every limit
(set too high to refuse, so each check runs), the per-IP limit, metrics and JSON request
logs. It passes or fails nothing.

    make bench                       # or: .venv/bin/python bench/gateway_bench.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil

from tollgate_contract.keys import key_hash

BIN = Path(sys.executable).parent
KEY = "sk-bench"
CHAT = (
    b'{"model":"sim-llama","messages":[{"role":"user","content":"benchmark me"}],"max_tokens":%d%s}'
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 20) -> float:
    """Seconds until `url` answers 200."""
    import urllib.request

    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return time.monotonic() - start
        except OSError:
            time.sleep(0.005)
    raise SystemExit(f"{url} not ready after {timeout} s")


def limits_env(directory: Path) -> dict[str, str]:
    """The environment that puts the bench key under a policy with every limit (requests
    and tokens per minute, tokens per day, concurrency) set too high ever to refuse, so
    every check runs on every request: its configuration document is written into
    `directory`."""
    big = 10**12
    policy = {
        "requestsPerMinute": big,
        "tokensPerMinute": big,
        "tokensPerDay": big,
        "maxConcurrentRequests": 10000,
    }
    config = directory / "limits.json"
    config.write_text(
        json.dumps(
            {
                "apiVersion": "tollgate.dev/v1alpha1",
                "kind": "GatewayConfig",
                "policies": {"all-limits": policy},
                "keys": {key_hash(KEY): {"name": "bench", "policy": "all-limits"}},
            }
        )
    )
    return {"GATEWAY_CONFIG_FILE": str(config), "GATEWAY_API_KEYS": ""}


@contextlib.contextmanager
def gateway_process(env: dict[str, str]) -> Iterator[tuple[str, psutil.Process]]:
    """A gateway on a free port with `env` (over sane bench defaults): its chat URL and
    process, stopped with SIGTERM afterwards. The per-IP limit stays on (checked on every
    request) but above what one load generator on one address sends."""
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "tollgate-gateway")],
        env={
            **os.environ,
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(port),
            "GATEWAY_API_KEYS": f"bench:{KEY}",
            "GATEWAY_IP_RATE_PER_SECOND": "1000000",
            **env,
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/ready")
        yield f"http://127.0.0.1:{port}/v1/chat/completions", psutil.Process(proc.pid)
    finally:
        _stop(proc)


NGINX_CONF = """
worker_processes 1;
daemon off;
error_log stderr warn;
pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir};
    proxy_temp_path {dir};
    fastcgi_temp_path {dir};
    uwsgi_temp_path {dir};
    scgi_temp_path {dir};
    upstream sim {{ server 127.0.0.1:{sim_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


@contextlib.contextmanager
def nginx_process(sim_port: int) -> Iterator[tuple[str, psutil.Process] | None]:
    """nginx in front of the simulator (its one worker is what is measured), or None."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "nginx-light"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
    if not Path(binary).exists():
        print("(nginx is not installed and could not be: no nginx row)")
        yield None
        return
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        conf = Path(tmp, "nginx.conf")
        conf.write_text(NGINX_CONF.format(dir=tmp, sim_port=sim_port, port=port))
        proc = subprocess.Popen([binary, "-c", str(conf), "-p", tmp], stderr=subprocess.DEVNULL)
        try:
            wait_http(f"http://127.0.0.1:{port}/health")
            master = psutil.Process(proc.pid)
            workers = master.children()
            yield f"http://127.0.0.1:{port}", workers[0] if workers else master
        finally:
            proc.send_signal(signal.SIGQUIT)
            proc.wait(10)


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    """The process and its children: a gateway's supervisor and workers."""
    return [proc, *proc.children(recursive=True)]


def cpu_seconds(proc: psutil.Process) -> float:
    total = 0.0
    for member in _tree(proc):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = member.cpu_times()
            total += times.user + times.system
    return total


def rss_mib(proc: psutil.Process) -> float:
    """Resident memory of the process tree; with workers, the pages they share (forked
    from one supervisor) are counted once (USS summed, plus the supervisor's shared)."""
    members = _tree(proc)
    if len(members) == 1:
        return proc.memory_info().rss / 2**20
    full = [m.memory_full_info() for m in members]
    return (sum(f.uss for f in full) + full[0].shared) / 2**20


@dataclass
class Result:
    requests: int
    seconds: float
    latencies: list[float]
    overheads: list[float]
    cpu_target: float
    cpu_sim: float
    rss_mb: float

    def pct(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


async def drive(
    url: str, body: bytes, stream: bool, concurrency: int, total: int, extra: dict[str, str]
) -> tuple:
    latencies: list[float] = []
    overheads: list[float] = []
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json", **extra}
    remaining = total
    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=3)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                start = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as resp:
                    if resp.status != 200:
                        raise SystemExit(f"{url}: {resp.status} {await resp.text()}")
                    if stream:
                        first = None
                        async for _ in resp.content.iter_any():
                            if first is None:
                                first = time.perf_counter() - start
                        latencies.append(first or 0.0)
                    else:
                        await resp.read()
                        latencies.append(time.perf_counter() - start)
                    overhead = resp.headers.get("x-tollgate-overhead-ms")
                    if overhead is not None:
                        overheads.append(float(overhead))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start, latencies, overheads


def measure(
    target: psutil.Process,
    sim: psutil.Process,
    url: str,
    body: bytes,
    stream: bool,
    concurrency: int,
    total: int,
    headers: dict[str, str] | None = None,
) -> Result:
    """`headers`: more request headers (the simulator's `x-sim-*` knobs)."""
    extra = headers or {}
    asyncio.run(drive(url, body, stream, concurrency, max(50, total // 10), extra))  # warm-up
    cpu_t, cpu_s = cpu_seconds(target), cpu_seconds(sim)
    seconds, latencies, overheads = asyncio.run(drive(url, body, stream, concurrency, total, extra))
    return Result(
        requests=total,
        seconds=seconds,
        latencies=latencies,
        overheads=overheads,
        cpu_target=(cpu_seconds(target) - cpu_t) / total * 1000,
        cpu_sim=(cpu_seconds(sim) - cpu_s) / total * 1000,
        rss_mb=rss_mib(target),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument(
        "--gateway-cmd",
        default=str(BIN / "tollgate-gateway"),
        help="command that starts the gateway (to measure variants)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="GATEWAY_WORKERS (CPU and RSS: all of them)"
    )
    args = parser.parse_args()
    scale = 0.2 if args.quick else 1.0

    sim_port, gw_port = free_port(), free_port()
    stack = contextlib.ExitStack()  # closed last to first: gateway, nginx, simulator, config
    config_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="tollgate-bench-"))
    sim = subprocess.Popen(
        [str(BIN / "tollgate-sim"), "--port", str(sim_port)], stdout=subprocess.DEVNULL
    )
    stack.callback(_stop, sim)
    env = {
        **os.environ,
        "VLLM_URL": f"http://127.0.0.1:{sim_port}",
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(gw_port),
        # The key under a policy of every limit: all the per-key checks run (quota_bench
        # measures what they add).
        **limits_env(Path(config_dir)),
        "LOG_LEVEL": os.environ.get("LOG_LEVEL", "INFO"),
        # The per-IP limit stays on (checked on every request) but above what one load
        # generator on one address sends.
        "GATEWAY_IP_RATE_PER_SECOND": "1000000",
        "GATEWAY_WORKERS": str(args.workers),
        "GATEWAY_METRICS_PORT": str(free_port()),
        # The paced workload's knob reaches the simulator (one prefix check per header).
        "GATEWAY_FORWARD_HEADERS": "x-sim-*",
    }
    try:
        wait_http(f"http://127.0.0.1:{sim_port}/health")
        # nginx first: its start (an apt-get install, the first time) is not the gateway's.
        nginx = stack.enter_context(nginx_process(sim_port))
        started = time.monotonic()
        gateway = subprocess.Popen(
            args.gateway_cmd.split(), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        stack.callback(_stop, gateway)
        wait_http(f"http://127.0.0.1:{gw_port}/ready")
        ready_s = time.monotonic() - started
        gw_proc, sim_proc = psutil.Process(gateway.pid), psutil.Process(sim.pid)
        time.sleep(0.5)
        idle_rss = rss_mib(gw_proc)
        print(
            f"gateway ({args.workers} worker{'s' if args.workers > 1 else ''}):"
            f" start -> /ready {ready_s:.2f} s, idle RSS {idle_rss:.1f} MiB"
        )
        print(f"cpu: {psutil.cpu_count()} cores, python {sys.version.split()[0]}\n")
        header = (
            f"{'workload':<24}{'path':<9}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}"
            f"{'CPU ms/req':>12}{'sim CPU':>9}{'RSS MiB':>9}{'ovh ms':>8}"
        )
        print(header)
        print("-" * len(header))
        # (name, body, stream, simulator knobs, (concurrency, requests) runs). The paced
        # stream is what a client of a real model sees: one read per token, 5 ms apart,
        # where the other stream arrives in a few reads and measures the per-request cost.
        stream_body = CHAT % (64, b',"stream":true')
        workloads = [
            ("non-stream 16 tok", CHAT % (16, b""), False, {}, ((1, 2000), (32, 16000))),
            ("stream 64 tok", stream_body, True, {}, ((1, 2000), (32, 16000))),
            ("stream 64 @5ms", stream_body, True, {"x-sim-itl-ms": "5"}, ((32, 1280),)),
        ]
        for name, body, stream, knobs, runs in workloads:
            for concurrency, total in runs:
                n = int(total * scale * (0.5 if stream else 1))
                label = f"{name} c={concurrency}"
                direct = measure(
                    sim_proc,
                    sim_proc,
                    f"http://127.0.0.1:{sim_port}/v1/chat/completions",
                    body,
                    stream,
                    concurrency,
                    n,
                    knobs,
                )
                floor = (
                    measure(nginx[1], sim_proc, nginx[0] + "/v1/chat/completions", body,
                            stream, concurrency, n, knobs)
                    if nginx is not None
                    else None
                )  # fmt: skip
                proxied = measure(
                    gw_proc,
                    sim_proc,
                    f"http://127.0.0.1:{gw_port}/v1/chat/completions",
                    body,
                    stream,
                    concurrency,
                    n,
                    knobs,
                )
                ovh = statistics.median(proxied.overheads) if proxied.overheads else 0.0
                print(
                    f"{label:<24}{'direct':<9}{direct.rps:>8.0f}{direct.pct(0.5):>9.2f}"
                    f"{direct.pct(0.99):>9.2f}{direct.cpu_target:>12.3f}{'':>9}{'':>9}{'':>8}"
                )
                if floor is not None:
                    print(
                        f"{'':<24}{'nginx':<9}{floor.rps:>8.0f}{floor.pct(0.5):>9.2f}"
                        f"{floor.pct(0.99):>9.2f}{floor.cpu_target:>12.3f}"
                        f"{floor.cpu_sim:>9.3f}{floor.rss_mb:>9.1f}{'':>8}"
                    )
                print(
                    f"{'':<24}{'gateway':<9}{proxied.rps:>8.0f}{proxied.pct(0.5):>9.2f}"
                    f"{proxied.pct(0.99):>9.2f}{proxied.cpu_target:>12.3f}"
                    f"{proxied.cpu_sim:>9.3f}{proxied.rss_mb:>9.1f}{ovh:>8.3f}"
                )
                print(
                    f"{'':<24}{'ratio':<9}{proxied.rps / direct.rps:>8.2f}"
                    f"{proxied.pct(0.5) / direct.pct(0.5):>9.2f}"
                    f"{proxied.pct(0.99) / direct.pct(0.99):>9.2f}"
                    f"   added p50 {proxied.pct(0.5) - direct.pct(0.5):.3f} ms"
                )
                if floor is not None:
                    print(
                        f"{'':<24}{'÷ nginx':<9}{proxied.rps / floor.rps:>8.2f}"
                        f"{'':>18}{proxied.cpu_target / floor.cpu_target:>12.2f}"
                        f"   added p50 vs nginx's {proxied.pct(0.5) - direct.pct(0.5):.3f}"
                        f" / {floor.pct(0.5) - direct.pct(0.5):.3f} ms"
                    )
        print(
            "\nCPU ms/req: direct rows = the simulator's own CPU; nginx rows = its worker's;"
            " gateway rows = the gateway's.\nsim CPU: the simulator's CPU per request during"
            " that run (the machine's speed today).\n÷ nginx: throughput and CPU per request"
            " as multiples of nginx's."
        )
    finally:
        stack.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


if __name__ == "__main__":
    main()
