"""The numbers the workers of one pod share: per-IP rate state and per-key in-flight counts.

With `GATEWAY_WORKERS` > 1 several processes accept on one port, and a client's
connections land on any of them: a limit each process kept for itself would be multiplied
by the worker count. These tables live in one anonymous shared mapping made before the
workers are forked, so every worker reads and writes the same numbers. A POSIX record lock
(`fcntl`) serialises each update: unlike a semaphore, the kernel releases it when its
holder dies, so a killed worker cannot wedge the pod. With one worker the lock is a thread
lock, which costs next to nothing.

Both tables are fixed-size and hashed with the interpreter's string hash, which forked
workers inherit; a name is looked up in a short window of slots after its hash, so an
operation costs a few struct reads whatever the table holds, and memory is bounded
whatever clients send.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import tempfile
import threading
from contextlib import AbstractContextManager

_PROBES = 16
_INT = struct.Struct("q")  # one signed 64-bit number


class _RecordLock:
    """A POSIX record lock on a file only this pod's processes have open."""

    def __init__(self) -> None:
        with tempfile.TemporaryFile() as file:  # only its inode matters
            self._fd = os.dup(file.fileno())

    def __enter__(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)


PodLock = AbstractContextManager[object]


def pod_lock(workers: int) -> PodLock:
    """Mutual exclusion between the pod's worker processes: `with lock:`. One worker needs
    none, and gets a thread lock, taken and released in C: the lock is taken three times a
    request, and a Python `__enter__`/`__exit__` pair costs more than the update it guards.
    Neither may be taken again by its holder (a thread lock would wait forever)."""
    return threading.Lock() if workers == 1 else _RecordLock()


class RateTable:
    """Each client's GCRA theoretical arrival time, in integer microseconds. A slot whose
    time has passed is free: that client is back at a full burst, so forgetting it changes
    nothing. A window with no free slot gives up its earliest entry, the one closest to a
    full burst (16 busy clients on one window: tens of thousands at once)."""

    SLOTS = 1 << 16
    _RECORD = struct.Struct("2q")  # the client's hash, its theoretical arrival time

    def __init__(self, lock: PodLock) -> None:
        self.lock = lock
        self._memory = mmap.mmap(-1, self.SLOTS * self._RECORD.size)  # MAP_SHARED
        self._mask = self.SLOTS - 1

    def slot(self, client: str, now: int) -> tuple[int, int]:
        """`client`'s slot, claimed if it had none, and its time there (0 if just claimed);
        call with the lock held."""
        code = hash(client) or 1  # 0 marks a slot never used
        start = code & self._mask
        free = earliest = -1
        earliest_tat = 0
        for i in range(_PROBES):
            slot = (start + i) & self._mask
            owner, tat = self._RECORD.unpack_from(self._memory, slot * self._RECORD.size)
            if owner == code:
                return slot, tat
            if free < 0 and tat <= now:
                free = slot
            if earliest < 0 or tat < earliest_tat:
                earliest, earliest_tat = slot, tat
        chosen = free if free >= 0 else earliest
        self._RECORD.pack_into(self._memory, chosen * self._RECORD.size, code, 0)
        return chosen, 0

    def set_tat(self, slot: int, tat: int) -> None:
        _INT.pack_into(self._memory, slot * self._RECORD.size + 8, tat)

    def clients(self, now: int) -> int:
        """Clients not yet back at a full burst (a scan: for metrics, not requests)."""
        return sum(1 for _, tat in self._RECORD.iter_unpack(self._memory) if tat > now)


class KeyCounts:
    """Per key and per worker: requests in flight and the tokens they reserved. Each worker
    changes only its own region; a limit is checked on the sum over the pod. A slot whose
    counts are zero in every region is free (a key in flight always holds its slot). 16 384
    slots, looked up in a window of 16: busy windows need thousands of keys in flight at
    once (keys are named by the operator, not by clients); then `enter` refuses (`None`)."""

    SLOTS = 1 << 14
    _COUNTS = struct.Struct("2q")  # requests in flight, tokens reserved
    _HASH = _INT

    def __init__(self, lock: PodLock, workers: int) -> None:
        self.lock = lock
        self.workers = workers
        self.worker = 0  # this process's region, set by the worker at start
        self._region = self.SLOTS * self._COUNTS.size  # a whole number of pages
        self._memory = mmap.mmap(-1, self.SLOTS * self._HASH.size + workers * self._region)
        self._mask = self.SLOTS - 1

    def _counts_at(self, worker: int, slot: int) -> int:
        return self.SLOTS * self._HASH.size + worker * self._region + slot * self._COUNTS.size

    def _sums(self, slot: int) -> tuple[int, int]:
        inflight = reserved = 0
        for worker in range(self.workers):
            n, tokens = self._COUNTS.unpack_from(self._memory, self._counts_at(worker, slot))
            inflight += n
            reserved += tokens
        return inflight, reserved

    def _find(self, name: str, claim: bool) -> int:
        code = hash(name) or 1  # 0 marks a slot never used
        start = code & self._mask
        free = -1
        for i in range(_PROBES):
            slot = (start + i) & self._mask
            (owner,) = self._HASH.unpack_from(self._memory, slot * self._HASH.size)
            if owner == code:
                return slot
            if claim and free < 0 and self._sums(slot) == (0, 0):
                free = slot
        if free >= 0:
            self._HASH.pack_into(self._memory, free * self._HASH.size, code)
        return free

    def _add(self, slot: int, inflight: int, reserve: int) -> None:
        at = self._counts_at(self.worker, slot)
        n, tokens = self._COUNTS.unpack_from(self._memory, at)
        self._COUNTS.pack_into(self._memory, at, n + inflight, tokens + reserve)

    def enter(self, name: str, limit: int | None, reserve: int) -> int | None:
        """Count one more request of `name` reserving `reserve` tokens, unless the pod
        already has `limit` in flight: then `None`. Else the tokens the pod's other
        requests of `name` had reserved."""
        with self.lock:
            slot = self._find(name, claim=True)
            if slot < 0:
                return None
            inflight, reserved = self._sums(slot)
            if limit is not None and inflight >= limit:
                return None
            self._add(slot, 1, reserve)
            return reserved

    def leave(self, name: str, reserve: int) -> None:
        with self.lock:
            slot = self._find(name, claim=False)
            if slot >= 0:
                self._add(slot, -1, -reserve)

    def reserved(self, name: str) -> int:
        """Tokens reserved by the pod's requests of `name` in flight."""
        with self.lock:
            slot = self._find(name, claim=False)
            return self._sums(slot)[1] if slot >= 0 else 0

    def clear_worker(self) -> None:
        """Zero this worker's region: what a dead predecessor there had counted is gone.
        The pages are given back rather than written (MADV_REMOVE), so nothing is touched."""
        start = self._counts_at(self.worker, 0)
        with self.lock:
            self._memory.madvise(mmap.MADV_REMOVE, start, self._region)


class PodShare:
    """The pod's shared tables, made once before the workers start."""

    def __init__(self, workers: int) -> None:
        self.lock = pod_lock(workers)
        self.rates = RateTable(self.lock)
        self.keys = KeyCounts(self.lock, workers)
