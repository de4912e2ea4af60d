"""`GATEWAY_WORKERS` > 1: a supervisor and forked workers, one pod's worth of gateway.

One Python process uses one core. The supervisor binds the client port once, makes the
pod's shared tables (`podshare`), and forks the workers; each runs the gateway exactly as
a single process does, accepting on the inherited socket. Forking, not spawning, is what
lets them share the tables (an anonymous shared mapping), the string-hash seed those
tables are indexed by, and the pages of the code the supervisor imported.

The supervisor then only:
- serves `GATEWAY_METRICS_PORT`: a scrape asks every worker for its metrics (each serves
  them on a Unix socket of its own) and merges them (`metrics.merge_workers`);
- forwards SIGTERM and SIGINT, waits while the workers drain, and exits 0 when they all
  did;
- forks a worker again when one dies outside a drain, after a pause that doubles with
  each quick death (1 s to 30 s); a worker that cannot start (status 2, bad
  configuration; 3, could not serve) stops the pod with its status instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType

from tollgate_gateway.metrics import CONTENT_TYPE, merge_workers
from tollgate_gateway.podshare import PodShare
from tollgate_gateway.settings import Settings

log = logging.getLogger("tollgate.workers")

# What a worker runs: the gateway on the shared socket, its metrics on a Unix socket; the
# exit status.
RunWorker = Callable[[Settings, PodShare, socket.socket, str], int]
# Exit statuses with which a worker says it cannot run at all: restarting cannot help.
CANNOT_START = (2, 3)
# A worker that lived this long is not restarted in a hurry: its pause starts again at 1 s.
STEADY_SECONDS = 30.0
_PR_SET_PDEATHSIG = 1


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Supervisor:
    def __init__(self, settings: Settings, run_worker: RunWorker) -> None:
        self.settings = settings
        self.run_worker = run_worker
        self.count = settings.gateway_workers
        self.share = PodShare(self.count)
        self.runtime = tempfile.mkdtemp(prefix="tollgate-workers-")
        self.sockets = [os.path.join(self.runtime, f"worker-{i}.sock") for i in range(self.count)]
        self.pids: dict[int, int] = {}  # pid -> worker index
        self.started: dict[int, float] = {}  # worker index -> when it was forked
        self.pause: dict[int, float] = {}  # worker index -> pause before its next fork
        self.restarts = 0
        self.draining = False
        self.metrics: ThreadingHTTPServer | None = None

    # --- the workers ---------------------------------------------------------------------
    def fork(self, index: int, listener: socket.socket) -> None:
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the supervisor's code
            status = 1
            try:
                status = self._become_worker(index, listener)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        self.pids[pid] = index
        self.started[index] = time.monotonic()
        log.info("worker started", extra={"event": "worker_started", "worker": index, "pid": pid})

    def _become_worker(self, index: int, listener: socket.socket) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        if self.metrics is not None:
            self.metrics.socket.close()  # the supervisor's port, not this process's
        # Die with the supervisor, so no orphan keeps serving a pod that is going away.
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() == 1:
            return 1  # the supervisor died before the line above
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sockets[index])
        self.share.keys.worker = index
        self.share.keys.clear_worker()  # what a dead predecessor counted is gone
        return self.run_worker(self.settings, self.share, listener, self.sockets[index])

    def _forward(self, sig: int, _frame: FrameType | None) -> None:
        if not self.draining:
            log.info("draining the workers", extra={"event": "drain", "signal": sig})
        self.draining = True
        for pid in list(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def run(self) -> int:
        listener = bind(self.settings.gateway_host, self.settings.gateway_port)
        self.metrics = self._serve_metrics()
        signal.signal(signal.SIGTERM, self._forward)
        signal.signal(signal.SIGINT, self._forward)
        try:
            for index in range(self.count):
                self.fork(index, listener)
            return self._watch(listener)
        finally:
            self.metrics.shutdown()
            self.metrics.server_close()
            listener.close()
            shutil.rmtree(self.runtime, ignore_errors=True)

    def _watch(self, listener: socket.socket) -> int:
        failed = 0
        while self.pids:
            pid, status = os.wait()
            index = self.pids.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            if self.draining:
                failed += code != 0
                log.info(
                    "worker stopped",
                    extra={"event": "worker_stopped", "worker": index, "pid": pid, "status": code},
                )
                continue
            if code in CANNOT_START:
                log.error(
                    "worker cannot start: stopping the gateway",
                    extra={"event": "worker_failed", "worker": index, "status": code},
                )
                self._forward(signal.SIGTERM, None)
                self._reap()
                return code
            lived = time.monotonic() - self.started[index]
            pause = 1.0 if lived > STEADY_SECONDS else min(2 * self.pause.get(index, 0.5), 30.0)
            self.pause[index] = pause
            log.error(
                "worker died: starting it again",
                extra={
                    "event": "worker_died",
                    "worker": index,
                    "pid": pid,
                    "status": code,
                    "restart_in_seconds": pause,
                },
            )
            deadline = time.monotonic() + pause
            while not self.draining and time.monotonic() < deadline:
                time.sleep(0.05)
            if not self.draining:
                self.restarts += 1
                self.fork(index, listener)
        return 1 if failed else 0

    def _reap(self) -> None:
        while self.pids:
            pid, _ = os.wait()
            self.pids.pop(pid, None)

    # --- the pod's metrics ---------------------------------------------------------------
    def scrape(self) -> bytes:
        texts = [text for path in self.sockets if (text := _ask(path)) is not None]
        own = (
            "# HELP tollgate_workers Worker processes running.\n"
            "# TYPE tollgate_workers gauge\n"
            f"tollgate_workers {len(self.pids)}\n"
            "# HELP tollgate_worker_restarts_total Workers started again after dying.\n"
            "# TYPE tollgate_worker_restarts_total counter\n"
            f"tollgate_worker_restarts_total {self.restarts}\n"
        )
        return (merge_workers(texts) + own).encode()

    def _serve_metrics(self) -> ThreadingHTTPServer:
        supervisor = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404)
                    return
                body = supervisor.scrape()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes are not worth a log line

        port = self.settings.gateway_metrics_port or 0
        server = ThreadingHTTPServer((self.settings.gateway_host, port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        return server


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=5)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def _ask(path: str) -> str | None:
    """One worker's metrics; None while it is starting or gone."""
    connection = _UnixConnection(path)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        return response.read().decode() if response.status == 200 else None
    except OSError:
        return None
    finally:
        connection.close()


def supervise(settings: Settings, run_worker: RunWorker) -> int:
    return Supervisor(settings, run_worker).run()
