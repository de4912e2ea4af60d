"""GPU exporter benchmark: 8 simulated GPUs, figures printed, nothing asserted.

Runs the real exporter process over the C stand-in libnvidia-ml (built here from
tests/exporter/fake_nvml/fake_nvml.c, so the real pynvml/ctypes path is measured) with a
kubelet pod-resources gRPC server attached, the same with `--format both` (native and
dcgm-compatible renderings), and over the pure-Python `--fake-gpus 8`. For each: scrape
latency (one keep-alive client, 20 concurrent keep-alive clients like 20 Prometheus servers,
and a new connection each time), snapshot duration (gather + render, as the exporter reports
it), one GPU's NVML round, CPU per collect and per scrape (from /proc via psutil), and RSS.

    .venv/bin/python bench/exporter_bench.py [--scrapes 2000] [--idle-seconds 10]

To measure another version of the exporter with the same bench, put its package first:
`PYTHONPATH=<checkout>/services/gpu-exporter .venv/bin/python bench/exporter_bench.py`.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
C_SOURCE = REPO / "tests" / "exporter" / "fake_nvml" / "fake_nvml.c"
GIB = 1 << 30


def build_stand_in(out: Path) -> Path:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        sys.exit("gcc is needed to build the stand-in libnvidia-ml.so.1")
    subprocess.run(
        [gcc, "-shared", "-fPIC", "-O2", "-fvisibility=hidden", "-o",
         str(out / "libnvidia-ml.so.1"), str(C_SOURCE), "-lpthread"],
        check=True,
    )  # fmt: skip
    return out


def write_scenario(path: Path, n: int = 8) -> None:
    lines = ["[system]", "driver = 550.54.15", "cuda = 12040"]
    for i in range(n):
        lines += [
            "[gpu]",
            "name = NVIDIA H100 80GB HBM3",
            f"uuid = GPU-bench000-0000-0000-0000-{i:012d}",
            f"pci_bus_id = 00000000:{0x18 + i:02X}:00.0",
            "cc_major = 9", "util_gpu = 80", "util_mem = 40", f"mem_total = {80 * GIB}",
            f"mem_used = {60 * GIB}", f"mem_reserved = {GIB // 2}", "temp = 60", "mem_temp = 70",
            "power_mw = 600000", "power_limit_mw = 700000", "power_default_limit_mw = 700000",
            "energy_mj = 123456789", "clock_sm = 1980", "clock_mem = 2619",
            "clock_graphics = 1980", "pcie_gen = 5", "pcie_width = 16", "pcie_gen_max = 5",
            "pcie_width_max = 16", "clock_events = 4", "nvlink = 1", "nvlink_tx_kib = 1",
            "nvlink_rx_kib = 2", "gpm = 1", "gpm_sm_util = 70", "gpm_sm_occupancy = 40",
            "gpm_tensor = 30", "gpm_dram = 50", "procs = 1000:1073741824",
            "unsupported = nvmlDeviceGetFanSpeed",
        ]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def start_kubelet(sock: Path):
    """A pod-resources server answering an empty List, so the gRPC client is loaded and
    polled, as on a real node."""
    import grpc

    def list_pods(_request: bytes, _context: object) -> bytes:
        return b""

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    handler = grpc.method_handlers_generic_handler(
        "v1.PodResourcesLister", {"List": grpc.unary_unary_rpc_method_handler(list_pods)}
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"unix://{sock}")
    server.start()
    return server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(body: str, name: str) -> float:
    m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", body, re.M)
    return float(m.group(1)) if m else float("nan")


def concurrent_scrapes(port: int, clients: int, per_client: int) -> list[float]:
    """`clients` keep-alive connections scraping back to back at once; all latencies."""
    lat: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        mine = []
        start.wait()
        for _ in range(per_client):
            t = time.perf_counter()
            conn.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
            conn.getresponse().read()
            mine.append(time.perf_counter() - t)
        conn.close()
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run(label: str, args: list[str], env: dict[str, str], scrapes: int, idle: float) -> dict:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tollgate_exporter.main", "--host", "127.0.0.1",
         "--port", str(port), "--interval", "1", "--log-level", "WARNING", *args],
        env=env,
    )  # fmt: skip
    ps = psutil.Process(proc.pid)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        deadline = time.monotonic() + 15
        body = ""
        while time.monotonic() < deadline:
            try:
                conn.request("GET", "/metrics")
                body = conn.getresponse().read().decode()
                if metric(body, "gpu_exporter_collects_total") >= 2:
                    break
            except OSError:
                conn.close()
            time.sleep(0.1)
        else:
            sys.exit(f"{label}: exporter did not come up")

        # idle: collects only
        cpu0, c0 = ps.cpu_times(), metric(body, "gpu_exporter_collects_total")
        durations = []
        gpu_rounds = []
        end = time.monotonic() + idle
        while time.monotonic() < end:
            time.sleep(0.5)
            conn.request("GET", "/metrics")
            body = conn.getresponse().read().decode()
            durations.append(metric(body, "gpu_exporter_collect_duration_seconds"))
            gpu_rounds.append(metric(body, "gpu_exporter_gpu_collect_duration_seconds"))
        cpu1, c1 = ps.cpu_times(), metric(body, "gpu_exporter_collects_total")
        idle_cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        # the ~2 scrapes/s taken above cost far less than a collect; see per-scrape CPU below
        cpu_per_collect = idle_cpu / max(1.0, c1 - c0)
        rss_idle = ps.memory_info().rss

        # scrape latency, keep-alive
        lat = []
        cpu0 = ps.cpu_times()
        for _ in range(scrapes):
            t = time.perf_counter()
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            resp.read()
            lat.append(time.perf_counter() - t)
        cpu1 = ps.cpu_times()
        cpu_per_scrape = ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / scrapes
        # 20 concurrent keep-alive scrapers (gzip, as Prometheus asks)
        per_client = max(1, scrapes // 20)
        cpu0 = ps.cpu_times()
        lat20 = concurrent_scrapes(port, 20, per_client)
        cpu1 = ps.cpu_times()
        cpu_per_scrape20 = ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / len(lat20)
        # scrape latency, a new connection each time (as with keep-alive off)
        lat_new = []
        for _ in range(max(1, scrapes // 4)):
            t = time.perf_counter()
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
            c.getresponse().read()
            c.close()
            lat_new.append(time.perf_counter() - t)
        conn.close()
        return {
            "label": label,
            "bytes": len(body),
            "series": sum(1 for line in body.splitlines() if line and line[0] != "#"),
            "p50": statistics.median(lat) * 1e3,
            "p99": pct(lat, 0.99) * 1e3,
            "p50_new": statistics.median(lat_new) * 1e3,
            "p99_new": pct(lat_new, 0.99) * 1e3,
            "p50_20": statistics.median(lat20) * 1e3,
            "p99_20": pct(lat20, 0.99) * 1e3,
            "cpu_scrape20_ms": cpu_per_scrape20 * 1e3,
            "collect_ms": statistics.median(durations) * 1e3,
            "collect_p99_ms": pct(durations, 0.99) * 1e3,
            "gpu_round_ms": statistics.median(gpu_rounds) * 1e3,
            "cpu_collect_ms": cpu_per_collect * 1e3,
            "cpu_scrape_ms": cpu_per_scrape * 1e3,
            "rss_idle": rss_idle / 2**20,
            "rss_after": ps.memory_info().rss / 2**20,
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scrapes", type=int, default=2000)
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    ap.add_argument(
        "--no-dcgm", dest="dcgm", action="store_false", help="skip the --format both run"
    )
    opts = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        lib = build_stand_in(tmpdir)
        scenario = tmpdir / "gpus.ini"
        write_scenario(scenario)
        sock = Path(f"/tmp/tg-bench-{os.getpid()}.sock")
        kubelet = start_kubelet(sock)
        try:
            env = {**os.environ, "LD_LIBRARY_PATH": str(lib), "FAKE_NVML_SCENARIO": str(scenario)}
            results.append(
                run(
                    "C stand-in NVML via pynvml, 8 GPUs, pod-resources on",
                    ["--pod-resources-socket", str(sock)],
                    env,
                    opts.scrapes,
                    opts.idle_seconds,
                )
            )
            if opts.dcgm:
                results.append(
                    run(
                        "C stand-in NVML, 8 GPUs, pod-resources on, --format both",
                        ["--pod-resources-socket", str(sock), "--format", "both"],
                        env,
                        opts.scrapes,
                        opts.idle_seconds,
                    )
                )
        finally:
            kubelet.stop(None)
            sock.unlink(missing_ok=True)
        results.append(
            run(
                "--fake-gpus 8 (pure Python), pod-resources off",
                ["--fake-gpus", "8", "--pod-resources-socket", ""],
                dict(os.environ),
                opts.scrapes,
                opts.idle_seconds,
            )
        )
    print(f"\nGPU exporter bench: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    for r in results:
        print(f"\n## {r['label']}")
        print(f"exposition: {r['series']} series, {r['bytes']} bytes")
        print(f"scrape latency keep-alive:  p50 {r['p50']:.2f} ms  p99 {r['p99']:.2f} ms")
        print(f"scrape latency 20 concurrent keep-alive+gzip: p50 {r['p50_20']:.2f} ms  "
              f"p99 {r['p99_20']:.2f} ms  CPU/scrape {r['cpu_scrape20_ms']:.3f} ms")  # fmt: skip
        print(f"scrape latency new conn+gzip: p50 {r['p50_new']:.2f} ms  p99 {r['p99_new']:.2f} ms")
        print(f"snapshot (self-reported collect) duration: p50 {r['collect_ms']:.2f} ms  "
              f"p99 {r['collect_p99_ms']:.2f} ms; one GPU's NVML round: "
              f"{r['gpu_round_ms']:.2f} ms")  # fmt: skip
        print(f"CPU per collect: {r['cpu_collect_ms']:.2f} ms   CPU per scrape: "
              f"{r['cpu_scrape_ms']:.3f} ms")  # fmt: skip
        print(f"RSS: {r['rss_idle']:.1f} MiB idle, {r['rss_after']:.1f} MiB after scrapes")


if __name__ == "__main__":
    main()
