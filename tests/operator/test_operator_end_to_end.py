"""Operator -> config Secret -> file on disk (as the kubelet writes it) -> a real gateway.

The kubelet materialises a Secret volume as a timestamped directory, a `..data` symlink to
it, and per-key symlinks through `..data`; an update writes a new directory and swaps
`..data` atomically. `SecretMirror` does exactly that, polling the emulated API every
0.2 s (a real kubelet takes up to its sync period plus the cache TTL, ~1-2 min: that is why
the gateway also watches its Secret through the API, GATEWAY_CONFIG_SECRET, which this test
does not cover). The bound asserted here is the operator's part plus the file path:
ApiKey deleted -> 401 within 5 s.
"""

from __future__ import annotations

import base64
import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from harness import Kube, Operator, wait_until
from servers import Gateway, Sim  # tests/support (pytest's pythonpath)
from test_operator_reconcile import CONFIG, NS, apikey, gateway

REVOCATION_BOUND_S = 5.0


class SecretMirror:
    """A kubelet's Secret volume, for one Secret, refreshed every `interval` seconds."""

    def __init__(self, kube: Kube, namespace: str, name: str, root: Path, interval: float = 0.2):
        self.kube, self.namespace, self.name, self.root = kube, namespace, name, root
        self.interval = interval
        self.version = ""
        self.updates = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        root.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> SecretMirror:
        self.sync()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(httpx.HTTPError):
                self.sync()

    def sync(self) -> None:
        secret = self.kube.get("Secret", self.namespace, self.name)
        if secret is None or secret["metadata"]["resourceVersion"] == self.version:
            return
        stamp = f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
        target = self.root / stamp
        target.mkdir()
        for key, value in (secret.get("data") or {}).items():
            (target / key).write_bytes(base64.b64decode(value))
        tmp_link = self.root / "..data_tmp"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(stamp)
        os.replace(tmp_link, self.root / "..data")  # the atomic swap
        for key in secret.get("data") or {}:
            link = self.root / key
            if not link.is_symlink():
                link.symlink_to(f"..data/{key}")
        self.version = secret["metadata"]["resourceVersion"]
        self.updates += 1


def status(gw: Gateway, key: str) -> int:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.get(gw.url + "/v1/models", headers=headers, timeout=5).status_code


def test_generated_key_works_then_is_revoked_within_the_bound(
    kube: Kube, operator: Operator, make_sim: Callable[..., Sim], tmp_path: Path
) -> None:
    kube.apply(gateway())
    kube.apply(apikey("team-a"))
    key = wait_until(lambda: kube.secret_data(NS, "team-a-key", "key"))
    wait_until(lambda: (kube.secret_data(NS, CONFIG, "config.json") or "").count("team-a"))

    volume = tmp_path / "etc-tollgate"
    with SecretMirror(kube, NS, CONFIG, volume) as mirror:
        gw = Gateway(
            tmp_path,
            make_sim().url,
            {"GATEWAY_API_KEYS": "", "GATEWAY_CONFIG_FILE": str(volume / "config.json")},
        )
        try:
            assert status(gw, key) == 200
            assert status(gw, "sk-not-a-key-at-all-000") == 401

            # A second key appears in the file through a `..data` swap: accepted too.
            kube.apply(apikey("team-b"))
            other = wait_until(lambda: kube.secret_data(NS, "team-b-key", "key"))
            wait_until(lambda: status(gw, other) == 200, timeout=REVOCATION_BOUND_S)
            assert mirror.updates >= 2

            started = time.monotonic()
            kube.delete("ApiKey", NS, "team-a")
            wait_until(lambda: status(gw, key) == 401, timeout=REVOCATION_BOUND_S)
            elapsed = time.monotonic() - started
            assert elapsed < REVOCATION_BOUND_S
            assert status(gw, other) == 200
        finally:
            gw.stop()
