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

A place is handed to a waiter when a request to a replica ends (`wake`), and waiters look
again every `RECHECK_SECONDS` (a replica that became healthy, a scrape that showed room),
so no event can be missed for long.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tollgate_gateway import errors
from tollgate_gateway.errors import Refusal

RECHECK_SECONDS = 0.1


@dataclass(slots=True)
class _Waiter:
    model: str | None
    granted: asyncio.Future[None]


@dataclass(slots=True)
class _Key:
    weight: int
    waiters: deque[_Waiter] = field(default_factory=deque)


class FairQueue:
    def __init__(self, has_room: Callable[[str | None, int], bool], timeout: float) -> None:
        """`has_room(model, pending)`: whether a replica serving `model` can take one more
        request, counting `pending` requests let through that have not reached it yet."""
        self._has_room = has_room
        self.timeout = timeout
        self._keys: dict[str, _Key] = {}
        self._turns: list[str] = []  # keys with waiters, in rotation
        self._pending = 0
        self.waiting = 0

    async def wait_turn(self, key: str, priority: int, model: str | None) -> None:
        """Return when the request may go to a replica; raise the `Refusal` if it may not."""
        if not self.waiting and self._has_room(model, self._pending):
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
        entry = self._keys.get(key)
        if entry is None:
            entry = self._keys[key] = _Key(1 + priority)
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
                if not self._has_room(head.model, self._pending):
                    break
                entry.waiters.popleft()
                head.granted.set_result(None)
                self._pending += 1
                served += 1
            if not entry.waiters:
                del turns[i], self._keys[key]
            elif served:
                del turns[i]
                turns.append(key)
                i = 0  # its turn is used: the front again, whose model may have room now
            else:
                i += 1
