"""Fair share under saturation: when every replica serving a model is full, requests wait
here, per key, and are let through in a weighted round robin.

Without it the replicas' own queues are first come, first served, so a key sending ten
times the requests of another takes ten times the places and the light key's latency
becomes the heavy key's backlog. With `GATEWAY_UPSTREAM_MAX_IN_FLIGHT` set, a replica
takes at most that many of this gateway's requests (vLLM's `max_num_seqs` is the natural
value: more only wait in its queue); past it, a request waits here for a place. Each key
with waiters gets a turn in a rotation, and `weight` places per turn (1 + its policy's
`priority`); a key with a negative priority is sheddable: refused at once instead of
queued. A request that waits longer than `timeout` is refused with 503 and Retry-After.

A place is handed to a waiter when a request holding one ends (`turn`, then `wake`: after
its key's count is down, so the places held for that key are right), and waiters look
again every `RECHECK_SECONDS` (a replica that became healthy, a scrape that showed room),
so no event can be missed for long.

Turns alone cannot help a light key whose request arrives just after the heavy key took
the last place: vLLM never gives a running request's place back, so the light one waits
for a generation to end. So places are held back: a key may not take the places that the
other keys active in the last `DEMAND_WINDOW` seconds would use, each up to its peak
demand then (requests in flight and waiting), at most its weighted share of all places,
less what it has in flight now. A key with steady light traffic then finds its places
free; a heavy key alone still gets every place, and gets back the held ones a window after
the light key goes quiet.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from tollgate_gateway import errors
from tollgate_gateway.errors import Refusal

RECHECK_SECONDS = 0.1
DEMAND_WINDOW = 5.0


@dataclass(slots=True)
class _Waiter:
    model: str | None
    granted: asyncio.Future[None]


@dataclass(slots=True)
class _Key:
    """A key in the queue: its places per turn, its waiters, its requests holding a place
    (`turn`) or wanting one, and its recent peak of those two."""

    weight: int
    waiters: deque[_Waiter] = field(default_factory=deque)
    inflight: int = 0
    wanting: int = 0
    peak: int = 0
    peak_at: float = 0.0

    def seen(self, now: float) -> None:
        demand = self.inflight + self.wanting
        if demand >= self.peak or now - self.peak_at > DEMAND_WINDOW:
            self.peak, self.peak_at = demand, now

    def recent_peak(self, now: float) -> int:
        """The peak, if it is recent; else today's demand (which starts a new peak)."""
        if now - self.peak_at > DEMAND_WINDOW:
            self.seen(now)
        return self.peak


class FairQueue:
    def __init__(
        self,
        has_room: Callable[[str | None, int], bool],
        timeout: float,
        places: Callable[[], int] = lambda: 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`has_room(model, pending)`: whether a replica serving `model` can take one more
        request, counting `pending` requests let through that have not reached it yet;
        `places()`: every place on the available replicas (the shares' total)."""
        self._has_room = has_room
        self._places = places
        self._clock = clock
        self.timeout = timeout
        self._keys: dict[str, _Key] = {}  # with waiters, or active in the last window
        self._turns: list[str] = []  # keys with waiters, in rotation
        self._pending = 0
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def turn(self, key: str, priority: int, model: str | None) -> AsyncIterator[None]:
        """Wait for a place (`wait_turn`), then hold it, as the key's, until the request
        ends."""
        entry = self._entry(key, priority)
        entry.wanting += 1  # also while on the fast path: it counts towards the peak
        entry.seen(self._clock())
        try:
            await self.wait_turn(key, priority, model)
        finally:
            entry.wanting -= 1
        entry.inflight += 1
        try:
            yield
        finally:
            entry.inflight -= 1
            self.wake()

    def _entry(self, key: str, priority: int) -> _Key:
        """The key's entry, its weight from this request's policy (a reload may change it)."""
        weight = 1 + max(priority, 0)
        entry = self._keys.get(key)
        if entry is None:
            entry = self._keys[key] = _Key(weight)
        entry.weight = weight
        return entry

    def reserved(self) -> dict[str, int]:
        """Per recently active key, the places held back for it: up to its recent peak,
        at most its weighted share of all places, less its requests in flight. O(active
        keys), once per request and per wake."""
        keys = self._keys
        if len(keys) < 2:
            return {}
        now = self._clock()
        active = []
        for k, d in list(keys.items()):
            peak = d.recent_peak(now)
            if peak or d.inflight or d.wanting:
                active.append((k, d, peak))
            elif not d.waiters:
                del keys[k]  # quiet for a window: no longer a share
        if len(active) < 2:
            return {}
        total_weight = sum(d.weight for _, d, _ in active)
        places = self._places()
        return {
            k: max(0, min(peak, places * d.weight // total_weight) - d.inflight)
            for k, d, peak in active
        }

    def _room(self, key: str, model: str | None, reserved: dict[str, int], total: int) -> bool:
        """Room for `key`: beyond the requests on their way and the places held back for
        the other keys (`total`: all of `reserved`)."""
        return self._has_room(model, self._pending + total - reserved.get(key, 0))

    async def wait_turn(self, key: str, priority: int, model: str | None) -> None:
        """Return when the request may go to a replica; raise the `Refusal` if it may not."""
        if not self.waiting:
            reserved = self.reserved()
            if self._room(key, model, reserved, sum(reserved.values())):
                return
        if priority < 0:
            raise Refusal(
                errors.OVERLOADED,
                "Every replica serving this model is busy and this key's traffic is"
                " sheddable; retry shortly.",
                1,
                reason="overload",
            )
        waiter = _Waiter(model, asyncio.get_running_loop().create_future())
        entry = self._entry(key, priority)
        if not entry.waiters:
            self._turns.append(key)
        entry.waiters.append(waiter)
        self.waiting += 1
        try:
            self.wake()
            deadline = asyncio.get_running_loop().time() + self.timeout
            while not waiter.granted.done():
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    raise Refusal(
                        errors.OVERLOADED,
                        "Every replica serving this model is busy; the request waited"
                        f" {self.timeout:g} s for a place. Retry shortly.",
                        1,
                        reason="overload",
                    )
                with contextlib.suppress(TimeoutError):
                    wait = min(left, RECHECK_SECONDS)
                    await asyncio.wait_for(asyncio.shield(waiter.granted), wait)
                if not waiter.granted.done():
                    self.wake()
        finally:
            self.waiting -= 1
            if waiter.granted.done():
                self._pending -= 1  # it goes on to its replica now, synchronously
            else:
                waiter.granted.cancel()  # timed out or the client left: not a waiter
                self.wake()

    def wake(self) -> None:
        """Let waiters through while there is room. The key at the front of the rotation
        goes first, up to its weight, then to the back; a key whose first waiter finds
        no room (its model's replicas are full) keeps its place at the front, and the
        keys behind it are tried."""
        turns = self._turns
        reserved = self.reserved()
        total = sum(reserved.values())
        i = 0
        while i < len(turns):
            key = turns[i]
            entry = self._keys[key]
            served = 0
            while entry.waiters and served < entry.weight:
                head = entry.waiters[0]
                if head.granted.done():  # cancelled: gone
                    entry.waiters.popleft()
                    continue
                if not self._room(key, head.model, reserved, total):
                    break
                entry.waiters.popleft()
                head.granted.set_result(None)
                self._pending += 1
                served += 1
            if not entry.waiters:
                del turns[i]  # the entry stays while the key is active (`reserved`)
            elif served:
                del turns[i]
                turns.append(key)
                i = 0  # its turn is used: the front again, whose model may have room now
            else:
                i += 1
