"""Real processes on 127.0.0.1 for the tests: the simulator, the gateway, the exporter.

Every wait here has a deadline scaled by `TOLLGATE_TEST_TIMEOUT_SCALE` (default 3), so the
suite holds on a machine whose cores are busy; a test states the time something needs on
a quiet machine, never a race against a poll. A failed wait names what it waited for and,
when it waited on a process, shows the last lines of that process's log. Each process
runs in its own process group and dies with the test run (`PR_SET_PDEATHSIG`): `stop`
kills the whole group, and whatever a failing test left behind is killed at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

BIN = Path(sys.executable).parent
T = TypeVar("T")
# The keys every test gateway knows (GATEWAY_API_KEYS), as team-a and team-b.
KEY_A = "sk-test-a"
KEY_B = "sk-test-b"
TIMEOUT_SCALE = float(os.environ.get("TOLLGATE_TEST_TIMEOUT_SCALE", "3"))
LOG_TAIL_LINES = 40


def scaled(seconds: float) -> float:
    """A quiet machine's `seconds`, stretched for a busy one."""
    return seconds * TIMEOUT_SCALE


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "",
    process: Process | None = None,
) -> T:
    """Poll until `predicate()` is truthy; its value, or AssertionError after `timeout`
    (scaled) saying what was awaited, the last value seen and `process`'s log tail."""
    limit = scaled(timeout)
    deadline = time.monotonic() + limit
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            name = what or getattr(predicate, "__qualname__", repr(predicate))
            message = f"not within {limit:.0f} s: {name} (last: {value!r})"
            if process is not None:
                message += "\n" + process.describe()
            raise AssertionError(message)
        time.sleep(interval)


_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when pytest dies. (The signal follows the thread
    that started the child, so only children of the main thread get it.)"""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


_running: set[Process] = set()


@atexit.register
def _kill_leftovers() -> None:
    for process in list(_running):
        process.kill()


class Process:
    """A child process whose output goes to a file the test can read."""

    url: str

    def __init__(self, argv: list[str], env: dict[str, str | None], log_path: Path) -> None:
        """`env` is added to this process's environment; a None value removes a variable."""
        self.log_path = log_path
        self.name = f"{Path(argv[0]).name} ({log_path.name})"
        self._log = log_path.open("wb")
        full_env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
        self.proc = subprocess.Popen(
            argv,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent
            if threading.current_thread() is threading.main_thread()
            else None,
        )
        _running.add(self)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def describe(self) -> str:
        """The process, its state and the tail of its log: what a failed wait shows."""
        code = self.proc.poll()
        state = "running" if code is None else f"exited with {code}"
        tail = self.output().splitlines()[-LOG_TAIL_LINES:]
        return f"--- {self.name}, pid {self.proc.pid}, {state}; last log lines:\n" + "\n".join(tail)

    def lines(self) -> list[dict[str, Any]]:
        entries = []
        for line in self.output().splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
        return entries

    def wait_healthy(self, timeout: float = 10.0) -> None:
        """Until GET /health answers 200; fails at once with the output if it exited."""

        def up() -> bool:
            try:
                return httpx.get(self.url + "/health", timeout=scaled(1)).status_code == 200
            except httpx.TransportError:
                if self.proc.poll() is not None:
                    raise AssertionError(f"{self.name} exited:\n{self.describe()}") from None
                return False

        wait_until(up, timeout, what=f"{self.name} to answer GET /health", process=self)

    def wait_for(self, predicate: Callable[[], T | None], what: str, timeout: float = 10.0) -> T:
        """`wait_until` on a state of this process; a failure shows its log."""
        return wait_until(predicate, timeout, what=what, process=self)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 15.0) -> int:
        """The exit status, once the process has exited; fails with its log otherwise."""
        try:
            return self.proc.wait(scaled(timeout))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit:\n{self.describe()}") from None

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(scaled(timeout))
            except subprocess.TimeoutExpired:
                self.kill()
        self.kill()  # whatever the process group still holds
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the process group (the process and anything it started)."""
        _running.discard(self)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


class Sim(Process):
    def __init__(
        self, tmp: Path, *args: str, port: int | None = None, host: str = "127.0.0.1"
    ) -> None:
        self.port = port or free_port()
        argv = [str(BIN / "tollgate-sim"), "--host", host, "--port", str(self.port), *args]
        super().__init__(argv, {}, tmp / f"sim-{host}-{self.port}.log")
        self.url = f"http://{host}:{self.port}"
        self.wait_healthy()

    def stats(self) -> dict[str, Any]:
        return httpx.get(self.url + "/sim/stats").json()

    def configure(self, **knobs: Any) -> None:
        httpx.post(self.url + "/sim/config", json=knobs).raise_for_status()

    def reset(self) -> None:
        httpx.post(self.url + "/sim/reset").raise_for_status()


class Gateway(Process):
    def __init__(self, tmp: Path, upstream: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        full_env = {
            "VLLM_URL": upstream,
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(self.port),
            "GATEWAY_API_KEYS": f"team-a:{KEY_A},team-b:{KEY_B}",
            "UPSTREAM_HEALTH_INTERVAL_SECONDS": "0.2",
            # The simulator takes its per-request knobs from x-sim-* headers.
            "GATEWAY_FORWARD_HEADERS": "x-sim-*",
            "DATABASE_URL": f"sqlite:///{tmp}/usage-{self.port}.db",
            **(env or {}),
        }
        super().__init__([str(BIN / "tollgate-gateway")], full_env, tmp / f"gw-{self.port}.log")
        self.url = f"http://127.0.0.1:{self.port}"
        self.wait_healthy()

    def requests(self) -> list[dict[str, Any]]:
        return [e for e in self.lines() if e.get("event") == "request"]

    def request_log(self, request_id: str, timeout: float = 5.0) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            for entry in self.requests():
                if entry["request_id"] == request_id:
                    return entry
            return None

        return self.wait_for(find, f"the request log line of {request_id}", timeout)
