"""HTTP: `/metrics` serves the collector's pre-rendered snapshot; `/health` and `/ready` judge it.

`/metrics` serves the native exposition, or dcgm-exporter's with `--format dcgm`;
`/metrics/native` always the native one, `/metrics/dcgm` the dcgm one when it is rendered
(`--format dcgm` or `both`). `/health` (liveness) fails only when the collector cannot make
progress; `/ready` (readiness) also fails while NVML is down or any GPU is stale.

Served by the standard library's ThreadingHTTPServer. A scrape does no work beyond writing a
bytes object that already exists, so the server's only job is to not get in the way: threads
cost nothing while idle, keep-alive (HTTP/1.1) spares Prometheus a connect per scrape, and no
event loop or web framework sits in memory (this process targets <= 64 MB RSS). aiohttp or
prometheus_client's WSGI app would add megabytes and a second rendering path for no gain.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .collector import Snapshot
from .exposition import CONTENT_TYPE, gzip_bytes

log = logging.getLogger(__name__)

INDEX = (
    b"<html><head><title>tollgate GPU exporter</title></head><body>"
    b'<h1>tollgate GPU exporter</h1><p><a href="/metrics">/metrics</a> '
    b'<a href="/health">/health</a> <a href="/ready">/ready</a></p></body></html>\n'
)
FORMATS = ("native", "dcgm", "both")


class ExporterServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(
        self,
        address: tuple[str, int],
        snapshot: Callable[[], Snapshot],
        stale_after: float,
        metrics_format: str = "native",
    ) -> None:
        super().__init__(address, _Handler)
        self.snapshot = snapshot
        self.stale_after = stale_after
        self.metrics_format = metrics_format

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="http", daemon=True)
        thread.start()
        return thread


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body leave in two writes; without TCP_NODELAY, Nagle plus the client's
    # delayed ACK would add ~40 ms to every keep-alive scrape.
    disable_nagle_algorithm = True
    timeout = 120  # an idle keep-alive connection gives its thread back eventually
    server: ExporterServer

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._metrics(dcgm=self.server.metrics_format == "dcgm")
        elif path == "/metrics/native":
            self._metrics(dcgm=False)
        elif path == "/metrics/dcgm":
            self._metrics(dcgm=True)
        elif path in ("/health", "/healthz"):
            self._health(ready=False)
        elif path in ("/ready", "/readyz"):
            self._health(ready=True)
        elif path == "/":
            self._send(200, "text/html; charset=utf-8", INDEX)
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found\n")

    def _metrics(self, dcgm: bool) -> None:
        snap = self.server.snapshot()
        body, gzipped = snap.body, snap.gzipped
        if dcgm:
            if snap.dcgm_body is None or snap.dcgm_gzipped is None:
                if self.server.metrics_format == "native":
                    msg = b"dcgm format not rendered: start with --format dcgm or both\n"
                    self._send(404, "text/plain; charset=utf-8", msg)
                    return
                body, gzipped = b"", gzip_bytes(b"")  # before the first collect
            else:
                body, gzipped = snap.dcgm_body, snap.dcgm_gzipped
        if "gzip" in self.headers.get("Accept-Encoding", ""):
            self._send(200, CONTENT_TYPE, gzipped, gzip=True)
        else:
            self._send(200, CONTENT_TYPE, body)

    def _health(self, ready: bool) -> None:
        """Liveness fails only when the collector cannot make progress (its snapshot is old,
        NVML init hangs, every GPU hangs): a restart is the one remedy the kubelet has. No GPU
        or no driver is a state to report, not a reason to restart, so it fails readiness
        only, as does a single stale GPU: `kubectl get pods` shows the node needs a look."""
        snap = self.server.snapshot()
        age = None
        problems: list[str] = []
        if snap.finished_monotonic == 0.0:
            status = "starting"
        else:
            age = round(time.monotonic() - snap.finished_monotonic, 3)
            if age > self.server.stale_after:
                problems.append(f"snapshot {age:.0f}s old")
            if snap.stuck:
                problems.append(snap.stuck)
            status = "stuck" if problems else "ok"
        if ready and status == "ok":
            if not snap.nvml_up:
                problems.append("NVML down")
            if snap.stale_gpus:
                problems.append(f"{snap.stale_gpus} GPU(s) stale")
            status = "not ready" if problems else "ok"
        failed = status != "ok" and (ready or status != "starting")
        doc = {"status": status, "snapshot_age_seconds": age, "problems": problems}
        self._send(503 if failed else 200, "application/json", json.dumps(doc).encode() + b"\n")

    def _send(self, code: int, content_type: str, body: bytes, gzip: bool = False) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if gzip:
            self.send_header("Content-Encoding", "gzip")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Access logs off: a scrape every few seconds would drown the useful lines."""
