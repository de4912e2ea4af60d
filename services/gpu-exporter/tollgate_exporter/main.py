"""`tollgate-gpu-exporter`: flags and environment in, threads started, SIGTERM honoured.

Every flag has an environment variable so the DaemonSet can be configured without
rewriting its command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from typing import Any

from .collector import Collector
from .nvml import Nvml
from .podresources import DEFAULT_SOCKET, PodResources
from .server import FORMATS, ExporterServer

log = logging.getLogger("tollgate_exporter")


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="tollgate-gpu-exporter",
        description="Prometheus exporter for NVIDIA GPUs (NVML), with per-pod attribution.",
    )
    p.add_argument(
        "--host",
        default=_env("GPU_EXPORTER_HOST", "0.0.0.0"),
        help="listen address ($GPU_EXPORTER_HOST)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=int(_env("GPU_EXPORTER_PORT", "9101")),
        help="($GPU_EXPORTER_PORT)",
    )
    p.add_argument(
        "--interval",
        type=float,
        default=float(_env("GPU_EXPORTER_INTERVAL", "5")),
        help="seconds between NVML collects ($GPU_EXPORTER_INTERVAL)",
    )
    p.add_argument(
        "--node-name",
        default=_env("NODE_NAME", socket.gethostname()),
        help="value of the node label ($NODE_NAME, else the host name)",
    )
    p.add_argument(
        "--pod-resources-socket",
        default=_env("GPU_EXPORTER_POD_RESOURCES_SOCKET", DEFAULT_SOCKET),
        help="kubelet pod-resources socket; empty disables pod labels "
        "($GPU_EXPORTER_POD_RESOURCES_SOCKET)",
    )
    p.add_argument(
        "--pod-resources-interval",
        type=float,
        default=float(_env("GPU_EXPORTER_POD_RESOURCES_INTERVAL", "10")),
        help="seconds between kubelet List calls ($GPU_EXPORTER_POD_RESOURCES_INTERVAL)",
    )
    p.add_argument(
        "--fake-gpus",
        type=int,
        default=int(_env("GPU_EXPORTER_FAKE_GPUS", "0")),
        help="simulate N GPUs instead of using NVML, for demos ($GPU_EXPORTER_FAKE_GPUS)",
    )
    p.add_argument(
        "--format",
        dest="metrics_format",
        choices=FORMATS,
        default=_env("GPU_EXPORTER_FORMAT", "native"),
        help="what /metrics serves: native names, dcgm-exporter's (drop-in for its dashboards,"
        " alerts and HPA rules), or native with dcgm at /metrics/dcgm ($GPU_EXPORTER_FORMAT)",
    )
    p.add_argument(
        "--log-level",
        default=_env("GPU_EXPORTER_LOG_LEVEL", "INFO"),
        help="($GPU_EXPORTER_LOG_LEVEL)",
    )
    args = p.parse_args(argv)
    if args.interval <= 0:
        p.error("--interval must be positive")
    return args


def _binding(fake_gpus: int) -> Any:
    if fake_gpus > 0:
        from .fake import FakeBinding

        return FakeBinding(fake_gpus)
    import pynvml

    return pynvml


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    pods: PodResources | None = None
    if args.pod_resources_socket:
        pods = PodResources(args.pod_resources_socket, interval=args.pod_resources_interval)
    collector = Collector(
        Nvml(_binding(args.fake_gpus)),
        node=args.node_name,
        pods=pods.current if pods else None,
        self_metrics=pods.self_metrics if pods else None,
        interval=args.interval,
        dcgm_compat=args.metrics_format != "native",
    )
    try:
        server = ExporterServer(
            (args.host, args.port),
            snapshot=lambda: collector.snapshot,
            stale_after=max(30.0, 6 * args.interval),
            metrics_format=args.metrics_format,
        )
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", args.host, args.port, exc)
        return 2

    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d, shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    if pods is not None:
        pods.start()
    threading.Thread(target=collector.run, name="collector", daemon=True).start()
    server.serve_in_thread()
    log.info(
        "serving /metrics on %s:%d (interval %.3gs, node %s%s)",
        args.host,
        server.server_address[1],
        args.interval,
        args.node_name,
        f", {args.fake_gpus} fake GPUs" if args.fake_gpus else "",
    )
    stop.wait()
    server.shutdown()
    collector.stop()
    if pods is not None:
        pods.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
