"""XID errors counted from NVML's event stream, as a real counter.

dcgm-exporter exports the *last* XID as a gauge that never resets, which cannot say how many
happened or when. Here a thread blocks in `nvmlEventSetWait` and counts every XID per GPU and
code; the counts outlive NVML re-initialisations because they belong to the process.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from .nvml import Nvml, NvmlError

log = logging.getLogger(__name__)

Labels = tuple[tuple[str, str], ...]
WAIT_MS = 500


class XidCounts:
    """Thread-safe counts keyed by the GPU's stable labels and the XID code."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, Labels, int], int] = {}
        self._last: dict[str, int] = {}

    def add(self, uuid: str, labels: Labels, xid: int) -> None:
        with self._lock:
            key = (uuid, labels, xid)
            self._counts[key] = self._counts.get(key, 0) + 1
            self._last[uuid] = xid

    def last(self) -> dict[str, int]:
        """The latest XID code per GPU UUID: what dcgm-exporter's DCGM_FI_DEV_XID_ERRORS says."""
        with self._lock:
            return dict(self._last)

    def items(self) -> list[tuple[str, Labels, int, int]]:
        with self._lock:
            return [(u, labels, xid, n) for (u, labels, xid), n in self._counts.items()]


class XidWatcher:
    """One event thread per NVML session; stopped and replaced when NVML is re-initialised."""

    def __init__(
        self,
        nv: Nvml,
        gpus: dict[int, tuple[str, Labels, Any]],
        counts: XidCounts,
        on_event: Callable[[], None],
    ) -> None:
        self._nv = nv
        self._gpus = gpus  # handle key -> (uuid, labels, handle)
        self._counts = counts
        self._on_event = on_event
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nvml-xid", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * WAIT_MS / 1000)

    def _run(self) -> None:
        try:
            event_set = self._nv.event_set()
        except NvmlError as exc:
            log.warning("XID events unavailable: %s", exc)
            return
        registered = 0
        for uuid, _labels, handle in self._gpus.values():
            try:
                registered += self._nv.register_xid(handle, event_set)
            except NvmlError as exc:
                log.info("GPU %s: XID events not available: %s", uuid, exc)
        if not registered:
            self._free(event_set)
            return
        log.info("watching XID events on %d GPU(s)", registered)
        while not self._stop.is_set():
            try:
                event = self._nv.wait_event(event_set, WAIT_MS)
            except NvmlError as exc:
                # A lost GPU or a dying session: back off; the collector decides on re-init.
                log.warning("XID event wait failed: %s", exc)
                self._stop.wait(1.0)
                continue
            if event is None:
                continue
            key, _event_type, xid = event
            gpu = self._gpus.get(key)
            if gpu is None:
                continue
            self._counts.add(gpu[0], gpu[1], xid)
            log.warning("XID %d on GPU %s", xid, gpu[0])
            self._on_event()
        self._free(event_set)

    def _free(self, event_set: Any) -> None:
        with contextlib.suppress(NvmlError):
            self._nv.event_set_free(event_set)
