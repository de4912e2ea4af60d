"""One GPU, one thread: discovery and readings for a single device, isolated from the others.

A GPU falling off the bus makes NVML calls on it hang. With one thread per GPU, that hang
stops only this GPU's worker: the collector sees the call in flight for too long, marks this
GPU stale and keeps serving the others. When the call finally returns, the worker carries on;
if its NVML session was replaced meanwhile it exits without touching the new one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .nvml import GpuLost, Lifecycle, NotSupported, Nvml, NvmlError
from .probes import Probe, Sample, make_probes

log = logging.getLogger(__name__)

# A probe NVML answered NOT_SUPPORTED for is tried again after this many collects or seconds,
# whichever comes first: MIG switched off, or a driver update, changes the answer.
RETRY_COLLECTS = 25
RETRY_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class Identity:
    """What a GPU is, read once per NVML session."""

    uuid: str
    labels: dict[str, str]
    info: dict[str, str]


@dataclass(frozen=True, slots=True)
class Reading:
    """One completed round of a GPU's probes, as the collector renders it."""

    samples: list[Sample]
    lost: bool
    unsupported: tuple[str, ...]
    failing: tuple[str, ...]
    finished_monotonic: float
    finished_wall: float
    duration: float


@dataclass
class _Skip:
    since_collect: int
    since: float


@dataclass
class GpuWorker:
    """Discovers GPU `index` and runs its probes each time it is ticked."""

    nv: Nvml
    index: int
    generation: int
    base_labels: Callable[[int, str, str, str], dict[str, str]]
    system_info: dict[str, str]
    on_lifecycle: Callable[[int, Lifecycle], None]
    on_done: Callable[[], None]
    count_error: Callable[[int, str, int, BaseException], None]
    handle: Any = None
    identity: Identity | None = None
    discovery_error: str = ""
    reading: Reading | None = None
    in_flight_since: float | None = None
    in_flight_call: str = ""
    done_round: int = 0
    probes: list[tuple[str, Probe]] = field(default_factory=make_probes)
    _skipped: dict[str, _Skip] = field(default_factory=dict)
    _failing: set[str] = field(default_factory=set)
    _discovery_code: int | None = None
    _collects: int = 0
    _lost: bool = False
    _tick: threading.Event = field(default_factory=threading.Event)
    _round: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"gpu-{self.index}", daemon=True)
        self._thread.start()

    def tick(self, round_no: int) -> None:
        self._round = round_no
        self._tick.set()

    def stop(self) -> None:
        self._stop.set()
        self._tick.set()

    def join(self, timeout: float) -> bool:
        """True when the thread has exited (it may be stuck in a call that never returns)."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def close_probes(self) -> None:
        """Give back what stateful probes hold (GPM samples); only once the thread is done."""
        for _, probe in self.probes:
            close = getattr(probe, "close", None)
            if close is not None:
                with contextlib.suppress(NvmlError):
                    close(self.nv)

    @property
    def discovered(self) -> bool:
        return self.identity is not None

    def labels(self) -> dict[str, str]:
        if self.identity is not None:
            return self.identity.labels
        return self.base_labels(self.index, "", "", "")

    # --- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._tick.wait()
            self._tick.clear()
            if self._stop.is_set():
                return
            round_no = self._round
            self.in_flight_since = time.monotonic()
            try:
                self._collect()
            except Lifecycle as exc:
                if not self._stop.is_set():
                    self.on_lifecycle(self.generation, exc)
                return
            except Exception:  # a bug costs this GPU's round, never the thread
                log.exception("GPU %d: collect failed", self.index)
            finally:
                self.in_flight_since = None
                self.in_flight_call = ""
            if self._stop.is_set():
                return
            self.done_round = round_no
            self.on_done()

    def _collect(self) -> None:
        started = time.perf_counter()
        if self.identity is None and not self._discover():
            return
        samples: list[Sample] = []
        lost = self._run_probes(samples)
        if lost != self._lost:
            uuid = self.identity.uuid if self.identity else ""
            (log.error if lost else log.info)(
                "GPU %d (%s) is %s", self.index, uuid, "lost" if lost else "back"
            )
            self._lost = lost
        self._collects += 1
        self.reading = Reading(
            samples=samples,
            lost=lost,
            unsupported=tuple(sorted(self._skipped)),
            failing=tuple(sorted(self._failing)),
            finished_monotonic=time.monotonic(),
            finished_wall=time.time(),
            duration=time.perf_counter() - started,
        )

    def _call(self, name: str, read: Callable[[], Any]) -> Any:
        self.in_flight_call = name
        return read()

    def _discover(self) -> bool:
        nv = self.nv
        try:
            h = self._call("nvmlDeviceGetHandleByIndex", lambda: nv.handle(self.index))
            uuid = self._call("nvmlDeviceGetUUID", lambda: nv.uuid(h))
        except Lifecycle:
            raise
        except NvmlError as exc:
            if exc.code != self._discovery_code:
                log.error("GPU %d unreadable at discovery: %s", self.index, exc)
            self._discovery_code = exc.code
            self.discovery_error = "lost" if isinstance(exc, GpuLost) else "error"
            return False
        mig_mode = self._optional("nvmlDeviceGetMigMode", lambda: nv.mig_mode(h))
        info = {
            **self.system_info,
            "compute_capability": self._optional(
                "nvmlDeviceGetCudaComputeCapability", lambda: nv.compute_capability(h)
            ),
            "mig_mode": {"1": "enabled", "0": "disabled"}.get(mig_mode, "unsupported"),
        }
        labels = self.base_labels(
            self.index,
            uuid,
            self._optional("nvmlDeviceGetPciInfo", lambda: nv.pci_bus_id(h)),
            self._optional("nvmlDeviceGetName", lambda: nv.name(h)),
        )
        self.handle = h
        self.identity = Identity(uuid, labels, info)
        self.discovery_error = ""
        if self._lost:
            log.info("GPU %d (%s) is back", self.index, uuid)
            self._lost = False
        return True

    def _optional(self, name: str, read: Callable[[], Any]) -> str:
        """Identity details a GPU may not have (MIG mode on a T4): empty, never fatal."""
        try:
            return str(self._call(name, read))
        except Lifecycle:
            raise
        except NvmlError:
            return ""

    def _due(self, call: str) -> bool:
        skip = self._skipped.get(call)
        if skip is None:
            return True
        return (
            self._collects - skip.since_collect >= RETRY_COLLECTS
            or time.monotonic() - skip.since >= RETRY_SECONDS
        )

    def _run_probes(self, out: list[Sample]) -> bool:
        """Run every probe that is due; True when the GPU turned out lost."""
        for call, probe in self.probes:
            if not self._due(call):
                continue
            self.in_flight_call = call
            try:
                samples = list(probe(self.nv, self.handle))
            except NotSupported as exc:
                if call not in self._skipped:
                    log.info(
                        "GPU %d: %s not supported, retrying every %d collects or %.0f s (%s)",
                        self.index,
                        call,
                        RETRY_COLLECTS,
                        RETRY_SECONDS,
                        exc,
                    )
                self._skipped[call] = _Skip(self._collects, time.monotonic())
                self._failing.discard(call)
                continue
            except GpuLost as exc:
                self.count_error(self.index, call, exc.code, exc)
                return True
            except Lifecycle:
                raise
            except NvmlError as exc:
                self.count_error(self.index, call, exc.code, exc)
                self._failing.add(call)
                continue
            except Exception as exc:  # a bad transformation costs one probe, not the scrape
                self.count_error(self.index, call, -1, exc)
                self._failing.add(call)
                continue
            if self._skipped.pop(call, None) is not None:
                log.info("GPU %d: %s answers again", self.index, call)
            self._failing.discard(call)
            out.extend(samples)
        return False
