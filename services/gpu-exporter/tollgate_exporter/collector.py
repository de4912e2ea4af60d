"""The background sampler: one NVML session, read on a schedule into a pre-rendered snapshot.

Scrapes never call NVML or the kubelet. They read `Collector.snapshot`, an immutable object
replaced whole after each collect (a single reference assignment, atomic under the GIL), so a
hung driver call makes the data stale, visibly, via `gpu_exporter_last_collect_timestamp_seconds`
instead of making Prometheus time out.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .exposition import SampleSet, gzip_bytes
from .nvml import GpuLost, Lifecycle, NotSupported, Nvml, NvmlError
from .probes import PROBES, Gpm, Probe
from .xid import XidCounts, XidWatcher

log = logging.getLogger(__name__)

Owner = tuple[str, str, str]  # namespace, pod, container
PodMap = Mapping[str, list[Owner]]
Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a scrape serves: the exposition, pre-compressed, and when it was made."""

    body: bytes
    gzipped: bytes
    finished_monotonic: float


@dataclass
class Gpu:
    """A GPU's identity (read once per NVML session) and its per-GPU probe state."""

    index: int
    handle: Any
    uuid: str
    labels: dict[str, str]
    info: dict[str, str]
    probes: list[tuple[str, Probe]] = field(default_factory=list)
    unsupported: set[str] = field(default_factory=set)
    lost: bool = False


class Collector:
    """Owns the NVML session, the GPU list, the XID watcher and the current snapshot."""

    def __init__(
        self,
        nv: Nvml,
        node: str,
        pods: Callable[[], PodMap] | None = None,
        self_metrics: Callable[[SampleSet], None] | None = None,
        interval: float = 5.0,
    ) -> None:
        self._nv = nv
        self._node = node
        self._pods = pods or (lambda: {})
        self._self_metrics = self_metrics
        self.interval = interval
        self._gpus: list[Gpu] | None = None
        self._xid_counts = XidCounts()
        self._xid: XidWatcher | None = None
        self._down_reason: str | None = None
        self._errors: dict[str, int] = {}
        self._inits: dict[str, int] = {"success": 0, "failure": 0}
        self._logged: set[tuple[int, str, int]] = set()
        self._collects = 0
        self._last_duration = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.snapshot = Snapshot(b"", gzip_bytes(b""), 0.0)

    # --- session ------------------------------------------------------------------------
    def _ensure_session(self) -> bool:
        if self._gpus is not None:
            return True
        try:
            self._nv.init()
            self._gpus = self._discover()
        except NvmlError as exc:
            self._inits["failure"] += 1
            self._gpus = None
            reason = str(exc)
            if reason != self._down_reason:
                log.warning(
                    "NVML unavailable, exporting gpu_exporter_nvml_up 0 and retrying: %s", reason
                )
            self._down_reason = reason
            return False
        self._inits["success"] += 1
        if self._down_reason is not None or self._inits["success"] == 1:
            log.info("NVML initialised: %d GPU(s)", len(self._gpus))
        self._down_reason = None
        self._start_xid(self._gpus)
        return True

    def _drop_session(self, reason: str) -> None:
        log.warning("NVML session lost, re-initialising: %s", reason)
        self._down_reason = reason
        if self._xid is not None:
            self._xid.stop()
            self._xid = None
        self._gpus = None
        with contextlib.suppress(NvmlError):
            self._nv.shutdown()

    def _discover(self) -> list[Gpu]:
        nv = self._nv
        driver = nv.driver_version()
        cuda = _optional(nv.cuda_version)
        gpus = []
        for i in range(nv.device_count()):
            try:
                h = nv.handle(i)
                uuid = nv.uuid(h)
            except (GpuLost, NotSupported, NvmlError) as exc:
                if isinstance(exc, Lifecycle):
                    raise
                log.error("GPU %d unreadable at discovery: %s", i, exc)
                labels = self._base_labels(i, "", "", "")
                gpus.append(Gpu(i, None, "", labels, {}, lost=True))
                continue
            mig_mode = _optional(lambda h=h: nv.mig_mode(h))
            info = {
                "driver_version": driver,
                "cuda_version": cuda,
                "compute_capability": _optional(lambda h=h: nv.compute_capability(h)),
                "mig_mode": {"1": "enabled", "0": "disabled", "": "unsupported"}[str(mig_mode)],
            }
            labels = self._base_labels(
                i,
                uuid,
                _optional(lambda h=h: nv.pci_bus_id(h)),
                _optional(lambda h=h: nv.name(h)),
            )
            gpus.append(Gpu(i, h, uuid, labels, info, probes=[*PROBES, ("gpm", Gpm())]))
        return gpus

    def _base_labels(self, index: int, uuid: str, bus: str, model: str) -> dict[str, str]:
        return {
            "gpu": str(index),
            "uuid": uuid,
            "pci_bus_id": bus,
            "model": model,
            "node": self._node,
        }

    def _start_xid(self, gpus: list[Gpu]) -> None:
        watched = {
            Nvml.handle_key(g.handle): (g.uuid, tuple(g.labels.items()), g.handle)
            for g in gpus
            if g.handle is not None
        }
        self._xid = XidWatcher(self._nv, watched, self._xid_counts, self._wake.set)
        self._xid.start()

    # --- one collect --------------------------------------------------------------------
    def collect_once(self) -> Snapshot:
        started = time.perf_counter()
        ss = SampleSet()
        up = self._ensure_session()
        pods = self._safe_pods()
        if up and self._gpus is not None:
            try:
                for gpu in self._gpus:
                    self._collect_gpu(gpu, ss, pods)
            except Lifecycle as exc:
                self._errors[exc.call] = self._errors.get(exc.call, 0) + 1
                self._drop_session(str(exc))
                up = False
        self._render_xids(ss, pods)
        self._collects += 1
        ss.add("gpu_exporter_nvml_up", {}, 1 if up else 0)
        ss.add("gpu_exporter_gpus", {}, len(self._gpus) if up and self._gpus else 0)
        ss.add("gpu_exporter_collects_total", {}, self._collects)
        for result, n in self._inits.items():
            ss.add("gpu_exporter_nvml_inits_total", {"result": result}, n)
        for call, n in sorted(self._errors.items()):
            ss.add("gpu_exporter_nvml_errors_total", {"call": call}, n)
        if self._self_metrics is not None:
            self._self_metrics(ss)
        self._last_duration = time.perf_counter() - started
        ss.add("gpu_exporter_collect_duration_seconds", {}, round(self._last_duration, 6))
        ss.add("gpu_exporter_last_collect_timestamp_seconds", {}, round(time.time(), 3))
        body = ss.render()
        self.snapshot = Snapshot(body, gzip_bytes(body), time.monotonic())
        return self.snapshot

    def _safe_pods(self) -> PodMap:
        try:
            return self._pods()
        except Exception:  # pod labels are garnish: never let them cost the scrape
            log.exception("pod map unavailable")
            return {}

    def _collect_gpu(self, gpu: Gpu, ss: SampleSet, pods: PodMap) -> None:
        owners = pods.get(gpu.uuid, []) if gpu.uuid else []
        labels = _with_owner(gpu.labels, owners)
        ss.add("gpu_info", {**labels, **gpu.info}, 1)
        for owner in owners:
            ss.add("gpu_allocation_info", {**gpu.labels, **_owner_labels(owner)}, 1)
        for call in sorted(gpu.unsupported):
            ss.add("gpu_exporter_unsupported_metric", {**gpu.labels, "call": call}, 1)
        lost = gpu.handle is None
        if not lost:
            lost = self._run_probes(gpu, ss, labels, pods)
        if lost != gpu.lost:
            (log.error if lost else log.info)(
                "GPU %d (%s) is %s", gpu.index, gpu.uuid, "lost" if lost else "back"
            )
            gpu.lost = lost
        ss.add("gpu_lost", labels, 1 if lost else 0)

    def _run_probes(self, gpu: Gpu, ss: SampleSet, labels: dict[str, str], pods: PodMap) -> bool:
        """Run every probe still believed supported; True when the GPU turned out lost."""
        for call, probe in gpu.probes:
            if call in gpu.unsupported:
                continue
            try:
                samples = list(probe(self._nv, gpu.handle))
            except NotSupported as exc:
                gpu.unsupported.add(call)
                log.info(
                    "GPU %d: %s not supported, skipping it from now on (%s)", gpu.index, call, exc
                )
                continue
            except GpuLost as exc:
                self._count_error(gpu, call, exc.code, exc)
                return True
            except Lifecycle:
                raise
            except NvmlError as exc:
                self._count_error(gpu, call, exc.code, exc)
                continue
            except Exception as exc:  # a bad transformation costs one probe, not the scrape
                self._count_error(gpu, call, -1, exc)
                continue
            for name, extra, value in samples:
                if "mig_uuid" in extra:
                    mig_owners = pods.get(extra["mig_uuid"]) or pods.get(
                        f"{gpu.uuid}/{extra['gpu_instance']}/{extra['compute_instance']}", []
                    )
                    for owner in mig_owners:
                        ss.add(
                            "gpu_allocation_info",
                            {**gpu.labels, "mig_uuid": extra["mig_uuid"], **_owner_labels(owner)},
                            1,
                        )
                    ss.add(name, {**_with_owner(gpu.labels, mig_owners), **extra}, value)
                else:
                    ss.add(name, {**labels, **extra} if extra else labels, value)
        return False

    def _count_error(self, gpu: Gpu, call: str, code: int, exc: BaseException) -> None:
        self._errors[call] = self._errors.get(call, 0) + 1
        key = (gpu.index, call, code)
        if key not in self._logged:  # once per GPU, call and error: no log storms
            self._logged.add(key)
            log.warning("GPU %d: %s failed: %s", gpu.index, call, exc, exc_info=code == -1)

    def _render_xids(self, ss: SampleSet, pods: PodMap) -> None:
        for uuid, labels, xid, n in self._xid_counts.items():
            base = _with_owner(dict(labels), pods.get(uuid, []))
            ss.add("gpu_xid_errors_total", {**base, "xid": str(xid)}, n)

    # --- the loop -----------------------------------------------------------------------
    def run(self) -> None:
        """Collect until stopped; an XID event wakes the loop early so counts show at once."""
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.collect_once()
            except Exception:
                log.exception("collect failed; keeping the previous snapshot")
            self._wake.wait(max(0.0, self.interval - (time.monotonic() - started)))
            self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._xid is not None:
            self._xid.stop()
        if self._gpus is not None:
            with contextlib.suppress(NvmlError):
                self._nv.shutdown()


def _optional(read: Callable[[], Any]) -> str:
    """Identity details a GPU may not have (MIG mode on a T4): empty, never fatal."""
    try:
        return str(read())
    except Lifecycle:
        raise
    except NvmlError:
        return ""


def _owner_labels(owner: Owner) -> dict[str, str]:
    namespace, pod, container = owner
    return {"namespace": namespace, "pod": pod, "container": container}


def _with_owner(labels: dict[str, str], owners: list[Owner]) -> dict[str, str]:
    """Pod labels go on the GPU's own series only when exactly one container holds it; a
    shared (time-sliced) GPU is attributed through `gpu_allocation_info` instead, so sums over
    pods never double-count."""
    if len(owners) != 1:
        return labels
    return {**labels, **_owner_labels(owners[0])}
