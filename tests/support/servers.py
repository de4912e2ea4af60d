"""Real processes on 127.0.0.1 for the tests: the simulator and the gateway."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "",
) -> T:
    """Poll until `predicate()` is truthy; its value, or AssertionError at the deadline
    (saying what was awaited and the last value seen)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what or predicate} (last: {value!r})")
        time.sleep(interval)


class Process:
    """A child process whose output goes to a file the test can read."""

    url: str

    def __init__(self, argv: list[str], env: dict[str, str | None], log_path: Path) -> None:
        """`env` is added to this process's environment; a None value removes a variable."""
        self.log_path = log_path
        self._log = log_path.open("wb")
        full_env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
        self.proc = subprocess.Popen(argv, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def lines(self) -> list[dict[str, Any]]:
        entries = []
        for line in self.output().splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
        return entries

    def wait_healthy(self) -> None:
        """Until GET /health answers 200; fails at once with the output if it exited."""

        def up() -> bool:
            try:
                return httpx.get(self.url + "/health", timeout=1).status_code == 200
            except httpx.TransportError:
                if self.proc.poll() is not None:
                    raise AssertionError(f"{self.proc.args[0]} exited:\n{self.output()}") from None
                return False

        wait_until(up)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


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

        return wait_until(find, timeout)
