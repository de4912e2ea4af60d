"""HTTP: `/metrics` serves the collector's pre-rendered snapshot, `/health` says if it is fresh.

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
from .exposition import CONTENT_TYPE

log = logging.getLogger(__name__)

INDEX = (
    b"<html><head><title>tollgate GPU exporter</title></head><body>"
    b'<h1>tollgate GPU exporter</h1><p><a href="/metrics">/metrics</a> '
    b'<a href="/health">/health</a></p></body></html>\n'
)


class ExporterServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(
        self,
        address: tuple[str, int],
        snapshot: Callable[[], Snapshot],
        stale_after: float,
    ) -> None:
        super().__init__(address, _Handler)
        self.snapshot = snapshot
        self.stale_after = stale_after

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
            self._metrics()
        elif path in ("/health", "/healthz"):
            self._health()
        elif path == "/":
            self._send(200, "text/html; charset=utf-8", INDEX)
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found\n")

    def _metrics(self) -> None:
        snap = self.server.snapshot()
        if "gzip" in self.headers.get("Accept-Encoding", ""):
            self._send(200, CONTENT_TYPE, snap.gzipped, gzip=True)
        else:
            self._send(200, CONTENT_TYPE, snap.body)

    def _health(self) -> None:
        """503 only when the collector is stuck (a hung driver call), so the kubelet restarts
        us; no GPU or no driver is a state to report, not a failure to restart over."""
        snap = self.server.snapshot()
        if snap.finished_monotonic == 0.0:
            status, age = "starting", None
        else:
            age = round(time.monotonic() - snap.finished_monotonic, 3)
            status = "ok" if age <= self.server.stale_after else "stale"
        body = json.dumps({"status": status, "snapshot_age_seconds": age}).encode() + b"\n"
        self._send(503 if status == "stale" else 200, "application/json", body)

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
