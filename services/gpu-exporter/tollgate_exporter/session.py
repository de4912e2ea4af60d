"""The NVML session: initialisation, one worker per GPU, the XID watcher, and re-initialisation.

It runs in its own thread so that an `nvmlInit` that hangs (a restarted pod on a node with a
wedged GPU) leaves the collector free to keep serving `gpu_exporter_nvml_up 0` and the session
marked stuck. NVML enumerates GPUs only at init, so a GPU that could not be read then is
looked for again by re-initialising, first after 25 collects or 30 s (whichever comes first),
then at doubling intervals up to 10 minutes while it stays missing, so a dead GPU does not
restart its neighbours' GPM windows and XID watch every 30 s forever.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

from .gpu import RETRY_COLLECTS, RETRY_SECONDS, GpuWorker
from .nvml import Lifecycle, Nvml, NvmlError
from .xid import XidCounts, XidWatcher

log = logging.getLogger(__name__)


class Session:
    """Owns NVML's lifecycle and the per-GPU workers; readers only look at its attributes."""

    def __init__(
        self,
        nv: Nvml,
        base_labels: Callable[[int, str, str, str], dict[str, str]],
        xid_counts: XidCounts,
        on_xid: Callable[[], None],
        on_done: Callable[[], None],
        interval: float,
    ) -> None:
        self._nv = nv
        self._base_labels = base_labels
        self._xid_counts = xid_counts
        self._on_xid = on_xid
        self._on_done = on_done
        self._rediscover_first = min(RETRY_SECONDS, RETRY_COLLECTS * interval)
        self.rediscover_after = self._rediscover_first
        self._retry = max(min(interval, 5.0), 0.05)
        # The XID watcher starts once every GPU is discovered or failed, or after this long:
        # a GPU whose discovery hangs must not leave the others' XIDs unwatched.
        self._settle = max(3 * interval, 2.0)
        self.generation = 0
        self.workers: list[GpuWorker] = []
        self.up = False
        self.down_reason: str | None = None
        self.busy_since: float | None = None  # inside init, discovery or shutdown
        self.busy_call = ""
        self.inits = {"success": 0, "failure": 0}
        self._errors: dict[str, int] = {}
        self._logged: set[tuple[int, str, int]] = set()
        self._lock = threading.Lock()
        self._xid: XidWatcher | None = None
        self._lifecycle: Lifecycle | None = None
        self._up_since = 0.0
        self._event = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nvml-session", daemon=True)

    # --- for the collector ---------------------------------------------------------------
    def start(self) -> None:
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()

    def errors(self) -> list[tuple[str, int]]:
        with self._lock:
            return sorted(self._errors.items())

    def stop(self) -> None:
        self._stop.set()
        self._event.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        if self.up:
            self._drop(None)

    # --- called from GPU worker threads --------------------------------------------------
    def count_error(self, index: int, call: str, code: int, exc: BaseException) -> None:
        with self._lock:
            self._errors[call] = self._errors.get(call, 0) + 1
            key = (index, call, code)
            first = key not in self._logged
            self._logged.add(key)
        if first:  # once per GPU, call and error: no log storms
            log.warning("GPU %d: %s failed: %s", index, call, exc, exc_info=code == -1)

    def _on_lifecycle(self, generation: int, exc: Lifecycle) -> None:
        if generation != self.generation:
            return  # a worker of an old session returning from a long call
        with self._lock:
            self._errors[exc.call] = self._errors.get(exc.call, 0) + 1
        self._lifecycle = exc
        self._event.set()

    # --- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.up:
                if not self._init():
                    self._stop.wait(self._retry)
                continue
            self._event.wait(min(self._retry, 1.0))
            self._event.clear()
            if self._stop.is_set():
                break
            if self._lifecycle is not None:
                self._drop(f"NVML session lost, re-initialising: {self._lifecycle}")
            elif self._undiscovered() and time.monotonic() - self._up_since >= (
                self.rediscover_after
            ):
                self._drop(None, rediscover=True)
            elif self._xid is None and (
                all(w.discovered or w.discovery_error for w in self.workers)
                or time.monotonic() - self._up_since > self._settle
            ):
                self._start_xid()
                if not self._undiscovered():
                    self.rediscover_after = self._rediscover_first

    def _busy(self, call: str) -> None:
        self.busy_call = call
        self.busy_since = time.monotonic()

    def _init(self) -> bool:
        nv = self._nv
        try:
            self._busy("nvmlInit")
            nv.init()
            self._busy("nvmlSystemGetDriverVersion")
            driver = nv.driver_version()
            self._busy("nvmlSystemGetCudaDriverVersion")
            try:
                cuda = nv.cuda_version()
            except Lifecycle:
                raise
            except NvmlError:
                cuda = ""
            self._busy("nvmlDeviceGetCount")
            count = nv.device_count()
        except NvmlError as exc:
            self.inits["failure"] += 1
            reason = str(exc)
            if reason != self.down_reason:
                log.warning(
                    "NVML unavailable, exporting gpu_exporter_nvml_up 0 and retrying: %s", reason
                )
            self.down_reason = reason
            with contextlib.suppress(NvmlError):
                nv.shutdown()
            return False
        finally:
            self.busy_since = None
        self.inits["success"] += 1
        if self.down_reason is not None or self.inits["success"] == 1:
            log.info("NVML initialised: %d GPU(s)", count)
        self.down_reason = None
        self._lifecycle = None
        self.generation += 1
        info = {"driver_version": driver, "cuda_version": cuda}
        self.workers = [
            GpuWorker(
                nv=nv,
                index=i,
                generation=self.generation,
                base_labels=self._base_labels,
                system_info=info,
                on_lifecycle=self._on_lifecycle,
                on_done=self._on_done,
                count_error=self.count_error,
            )
            for i in range(count)
        ]
        for worker in self.workers:
            worker.start()
        self._up_since = time.monotonic()
        self.up = True
        return True

    def _undiscovered(self) -> bool:
        return any(w.discovery_error for w in self.workers)

    def _start_xid(self) -> None:
        watched = {
            Nvml.handle_key(w.handle): (w.identity.uuid, tuple(w.identity.labels.items()), w.handle)
            for w in self.workers
            if w.identity is not None
        }
        self._xid = XidWatcher(self._nv, watched, self._xid_counts, self._on_xid)
        self._xid.start()

    def _drop(self, reason: str | None, rediscover: bool = False) -> None:
        """End the session: workers told to stop, GPM samples freed by those that did, shut
        down. A worker stuck in a call is left behind; it exits when the call returns."""
        if reason:
            log.warning("%s", reason)
        elif rediscover:
            missing = [w.index for w in self.workers if w.discovery_error]
            log.info("re-initialising NVML to look for GPU(s) %s again", missing)
            self.rediscover_after = min(self.rediscover_after * 2, 600.0)
        self.generation += 1
        self.up = False
        if self._xid is not None:
            self._xid.stop()
            self._xid = None
        workers, self.workers = self.workers, []
        for worker in workers:
            worker.stop()
        for worker in workers:
            if worker.join(0.5):
                worker.close_probes()
        self._busy("nvmlShutdown")
        try:
            with contextlib.suppress(NvmlError):
                self._nv.shutdown()
        finally:
            self.busy_since = None
