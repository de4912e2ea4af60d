"""The snapshot maker: ticks every GPU's worker, gathers what they read, renders it once.

Scrapes never call NVML or the kubelet. They read `Collector.snapshot`, an immutable object
replaced whole after each collect (a single reference assignment, atomic under the GIL). The
collector itself never calls NVML either: the session thread and the per-GPU workers do, so
a hung call freezes one GPU (marked in `gpu_exporter_gpu_stale`, its readings withheld) or
the session (`gpu_exporter_nvml_session_stuck`), while the self-metrics keep being served.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from . import dcgm
from .attribution import PodMap, gpu_owners, mig_owners, owner_labels, with_owner
from .exposition import SampleSet, gzip_bytes
from .gpu import GpuWorker
from .metrics import COUNTER, SPECS
from .nvml import Nvml
from .session import Session
from .xid import XidCounts

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a scrape serves, pre-compressed, and the health facts `/health` and `/ready` use."""

    body: bytes
    gzipped: bytes
    finished_monotonic: float
    dcgm_body: bytes | None = None
    dcgm_gzipped: bytes | None = None
    nvml_up: bool = False
    stuck: str = ""  # why the collector cannot make progress; empty when it can
    stale_gpus: int = 0


class Collector:
    """Owns the NVML session (through `Session`), the XID counts and the current snapshot."""

    def __init__(
        self,
        nv: Nvml,
        node: str,
        pods: Callable[[], PodMap] | None = None,
        self_metrics: Callable[[SampleSet], None] | None = None,
        interval: float = 5.0,
        dcgm_compat: bool = False,
    ) -> None:
        self._node = node
        self._pods = pods or (lambda: {})
        self._self_metrics = self_metrics
        self._dcgm = dcgm_compat
        self.interval = interval
        # A GPU whose call has been in flight this long is stale; generous, as a busy node can
        # make a healthy round slow, and a GPU off the bus hangs for tens of seconds.
        self.stale_after = max(3 * interval, 2.0)
        self._round_timeout = min(max(0.5 * interval, 0.05), 2.0)
        self._xid_counts = XidCounts()
        self._done = threading.Condition()
        self.session = Session(
            nv, self._base_labels, self._xid_counts, self._on_xid, self._on_done, interval
        )
        self._round = 0
        self._collects = 0
        self._last_duration = 0.0
        self._stale: set[int] = set()
        self._stuck_logged = ""
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.snapshot = Snapshot(b"", gzip_bytes(b""), 0.0)

    def _base_labels(self, index: int, uuid: str, bus: str, model: str) -> dict[str, str]:
        return {
            "gpu": str(index),
            "uuid": uuid,
            "pci_bus_id": bus,
            "model": model,
            "node": self._node,
        }

    def _on_done(self) -> None:
        with self._done:
            self._done.notify_all()

    def _on_xid(self) -> None:
        self._wake.set()

    # --- one collect --------------------------------------------------------------------
    def collect_once(self) -> Snapshot:
        """Tick the GPUs, wait (bounded) for their readings, render. Never blocks on NVML."""
        session = self.session
        session.start()
        deadline = time.monotonic() + self._round_timeout
        if not session.up and self._collects == 0:  # first round: let a quick init finish
            while not session.up and session.down_reason is None and time.monotonic() < deadline:
                time.sleep(0.005)
        self._round += 1
        round_no = self._round
        generation = session.generation
        # One GPU at a time: eight threads calling NVML at once cost more CPU in GIL hand-offs
        # than the calls themselves. A GPU that does not answer within its share of the round
        # only delays the next one by that share; the round's deadline then ticks the rest.
        share = max(0.05, self._round_timeout / 4)
        ticked = [w for w in list(session.workers) if w.in_flight_since is None]
        for worker in ticked:
            worker.tick(round_no)
            wait = min(share, deadline - time.monotonic())
            if wait > 0:
                self._wait(partial(_answered, worker, round_no), generation, wait)
        self._wait(
            lambda: all(w.done_round >= round_no for w in ticked),
            generation,
            deadline - time.monotonic(),
        )
        return self.render()

    def _wait(self, done: Callable[[], bool], generation: int, timeout: float) -> None:
        """Until `done` or the session changed (its workers will never answer), or timeout."""
        with self._done:
            self._done.wait_for(
                lambda: done() or self.session.generation != generation, max(0.0, timeout)
            )

    def render(self) -> Snapshot:
        started = time.perf_counter()
        session = self.session
        ss = SampleSet()
        pods = self._safe_pods()
        up = session.up
        workers = list(session.workers) if up else []
        now = time.monotonic()
        stale = 0
        for worker in workers:
            stale += self._render_gpu(worker, ss, pods, now)
        for _uuid, labels, xid, n in self._xid_counts.items():
            ss.add("gpu_xid_errors_total", {**dict(labels), "xid": str(xid)}, n)
        stuck = self._stuck(now, workers, stale)
        self._collects += 1
        ss.add("gpu_exporter_nvml_up", {}, 1 if up else 0)
        ss.add("gpu_exporter_gpus", {}, len(workers))
        ss.add("gpu_exporter_nvml_session_stuck", {}, 1 if stuck.startswith("NVML") else 0)
        ss.add("gpu_exporter_collects_total", {}, self._collects)
        for result, n in session.inits.items():
            ss.add("gpu_exporter_nvml_inits_total", {"result": result}, n)
        for call, n in session.errors():
            ss.add("gpu_exporter_nvml_errors_total", {"call": call}, n)
        if self._self_metrics is not None:
            self._self_metrics(ss)
        ss.add("gpu_exporter_collect_duration_seconds", {}, round(self._last_duration, 6))
        ss.add("gpu_exporter_last_collect_timestamp_seconds", {}, round(time.time(), 3))
        body = ss.render()
        dcgm_body = dcgm.render(ss, self._xid_counts.last()) if self._dcgm else None
        self.snapshot = Snapshot(
            body,
            gzip_bytes(body),
            time.monotonic(),
            dcgm_body,
            gzip_bytes(dcgm_body) if dcgm_body is not None else None,
            nvml_up=up,
            stuck=stuck,
            stale_gpus=stale,
        )
        self._last_duration = time.perf_counter() - started
        return self.snapshot

    def _stuck(self, now: float, workers: list[GpuWorker], stale: int) -> str:
        session = self.session
        busy = session.busy_since
        reason = ""
        if busy is not None and now - busy > self.stale_after:
            reason = f"NVML {session.busy_call} has not returned for {now - busy:.0f}s"
        elif workers and stale == len(workers):
            reason = "every GPU is stale"
        if reason != self._stuck_logged:
            (log.error if reason else log.info)("collector %s", reason or "unstuck")
            self._stuck_logged = reason
        return reason

    def _is_stale(self, worker: GpuWorker, now: float) -> bool:
        since = worker.in_flight_since
        if since is not None and now - since > self.stale_after:
            return True
        reading = worker.reading
        return reading is not None and now - reading.finished_monotonic > 2 * self.stale_after

    def _render_gpu(self, worker: GpuWorker, ss: SampleSet, pods: PodMap, now: float) -> int:
        """Add one GPU's series; 1 when it is stale (its readings withheld), else 0."""
        base = worker.labels()
        stale = self._is_stale(worker, now)
        if stale != (worker.index in self._stale):
            if stale:
                self._stale.add(worker.index)
                log.error(
                    "GPU %d (%s) is stale: %s has not returned for over %.0fs",
                    worker.index,
                    base["uuid"],
                    worker.in_flight_call or "its collect",
                    self.stale_after,
                )
            else:
                self._stale.discard(worker.index)
                log.info("GPU %d (%s) answers again", worker.index, base["uuid"])
        ss.add("gpu_exporter_gpu_stale", base, 1 if stale else 0)
        reading = worker.reading
        if reading is not None:
            ss.add(
                "gpu_exporter_gpu_last_collect_timestamp_seconds",
                base,
                round(reading.finished_wall, 3),
            )
            ss.add("gpu_exporter_gpu_collect_duration_seconds", base, round(reading.duration, 6))
        identity = worker.identity
        if identity is None:
            if worker.discovery_error == "lost":
                ss.add("gpu_lost", base, 1)
            return 1 if stale else 0
        owners = gpu_owners(pods, identity.uuid, worker.index)
        ss.add("gpu_info", {**with_owner(base, owners), **identity.info}, 1)
        for owner in owners:
            ss.add("gpu_allocation_info", {**base, **owner_labels(owner)}, 1)
        if stale or reading is None:
            return 1 if stale else 0
        for call in reading.unsupported:
            ss.add("gpu_exporter_unsupported_metric", {**base, "call": call}, 1)
        for call in reading.failing:
            ss.add("gpu_exporter_failing_metric", {**base, "call": call}, 1)
        gauge_labels = with_owner(base, owners)
        for name, extra, value in reading.samples:
            if "mig_uuid" in extra:
                migs = mig_owners(pods, identity.uuid, extra)
                for owner in migs:
                    ss.add(
                        "gpu_allocation_info",
                        {**base, "mig_uuid": extra["mig_uuid"], **owner_labels(owner)},
                        1,
                    )
                ss.add(name, {**with_owner(base, migs), **extra}, value)
            elif SPECS[name].kind == COUNTER:
                ss.add(name, {**base, **extra}, value)
            else:
                ss.add(name, {**gauge_labels, **extra}, value)
        ss.add("gpu_lost", gauge_labels, 1 if reading.lost else 0)
        return 0

    def _safe_pods(self) -> PodMap:
        try:
            return self._pods()
        except Exception:  # pod labels are garnish: never let them cost the scrape
            log.exception("pod map unavailable")
            return {}

    # --- the loop -----------------------------------------------------------------------
    def run(self) -> None:
        """Collect every interval; an XID event re-renders at once (no NVML call), so counts
        show without shortening any GPU's sampling window."""
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.collect_once()
            except Exception:
                log.exception("collect failed; keeping the previous snapshot")
            while not self._stop.is_set():
                remaining = self.interval - (time.monotonic() - started)
                if remaining <= 0 or not self._wake.wait(remaining):
                    break
                self._wake.clear()
                if not self._stop.is_set():
                    try:
                        self.render()
                    except Exception:
                        log.exception("render failed; keeping the previous snapshot")

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.session.stop()


def _answered(worker: GpuWorker, round_no: int) -> bool:
    return worker.done_round >= round_no


__all__ = ["Collector", "Nvml", "Snapshot"]
