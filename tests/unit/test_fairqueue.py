"""The fair queue on its own: who gets a place when, with a counted number of places."""

from __future__ import annotations

import asyncio

import pytest

from tollgate_gateway import fairqueue
from tollgate_gateway.errors import Refusal
from tollgate_gateway.fairqueue import FairQueue


class Places:
    """`free` places; a request let through takes one until `done`."""

    def __init__(self, free: int) -> None:
        self.free = free

    def has_room(self, model: str | None, pending: int) -> bool:
        return self.free > pending


async def settle() -> None:
    """Let every task that can run, run (a grant takes a few loop turns to resume)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def _request(queue: FairQueue, places: Places, key: str, order: list[str], priority=0):
    await queue.wait_turn(key, priority, "m")
    places.free -= 1  # it reached its replica
    order.append(key)


async def _a_light_key_is_not_stuck_behind_a_heavy_keys_backlog() -> None:
    places = Places(0)
    queue = FairQueue(places.has_room, timeout=30)
    order: list[str] = []
    heavy = [asyncio.create_task(_request(queue, places, "heavy", order)) for _ in range(10)]
    await asyncio.sleep(0)
    light = [asyncio.create_task(_request(queue, places, "light", order)) for _ in range(2)]
    await asyncio.sleep(0)
    assert queue.waiting == 12
    for _ in range(12):  # one place frees at a time, as requests end
        places.free += 1
        queue.wake()
        await settle()
    await asyncio.gather(*heavy, *light)
    assert order[:4] == ["heavy", "light", "heavy", "light"]
    assert queue.waiting == 0


async def _priority_is_places_per_turn_and_negative_is_sheddable() -> None:
    places = Places(0)
    queue = FairQueue(places.has_room, timeout=30)
    order: list[str] = []
    tasks = [asyncio.create_task(_request(queue, places, "gold", order, 2)) for _ in range(6)]
    tasks += [asyncio.create_task(_request(queue, places, "std", order)) for _ in range(6)]
    await asyncio.sleep(0)
    with pytest.raises(Refusal) as shed:
        await queue.wait_turn("batch", -1, "m")
    assert shed.value.kind.status == 503 and shed.value.reason == "overload"
    places.free = 8
    queue.wake()
    await settle()
    assert order == ["gold"] * 3 + ["std"] + ["gold"] * 3 + ["std"]
    places.free += 4
    queue.wake()
    await asyncio.gather(*tasks)


async def _a_waiter_that_times_out_or_leaves_gives_up_its_place() -> None:
    places = Places(0)
    queue = FairQueue(places.has_room, timeout=0.05)
    with pytest.raises(Refusal) as waited:
        await queue.wait_turn("a", 0, "m")
    assert "waited 0.05 s" in waited.value.message and queue.waiting == 0
    queue.timeout = 30
    order: list[str] = []
    leaving = asyncio.create_task(_request(queue, places, "a", order))
    staying = asyncio.create_task(_request(queue, places, "b", order))
    await asyncio.sleep(0)
    leaving.cancel()
    await asyncio.sleep(0)
    places.free = 1
    await staying
    assert order == ["b"] and queue.waiting == 0


async def _no_waiting_and_room_is_the_fast_path() -> None:
    places = Places(1)
    queue = FairQueue(places.has_room, timeout=30)
    await queue.wait_turn("a", 0, "m")  # returns at once, nothing queued
    assert queue.waiting == 0


def test_a_light_key_is_not_stuck_behind_a_heavy_keys_backlog() -> None:
    asyncio.run(_a_light_key_is_not_stuck_behind_a_heavy_keys_backlog())


def test_priority_is_places_per_turn_and_negative_is_sheddable() -> None:
    asyncio.run(_priority_is_places_per_turn_and_negative_is_sheddable())


def test_a_waiter_that_times_out_or_leaves_gives_up_its_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fairqueue, "RECHECK_SECONDS", 0.01)
    asyncio.run(_a_waiter_that_times_out_or_leaves_gives_up_its_place())


def test_no_waiting_and_room_is_the_fast_path() -> None:
    asyncio.run(_no_waiting_and_room_is_the_fast_path())


async def _hold(queue: FairQueue, places: Places, key: str, order: list[str], go: asyncio.Event):
    """A request that takes its place on a replica and keeps it until `go`."""
    async with queue.turn(key, 0, "m"):
        places.free -= 1
        order.append(key)
        await go.wait()
        places.free += 1


async def _a_recent_light_keys_places_are_held_for_it() -> None:
    now = [0.0]
    places = Places(8)
    queue = FairQueue(places.has_room, timeout=30, places=lambda: 8, clock=lambda: now[0])
    order: list[str] = []
    light_go, heavy_go = asyncio.Event(), asyncio.Event()
    light = [asyncio.create_task(_hold(queue, places, "light", order, light_go)) for _ in range(2)]
    await settle()
    light_go.set()
    await asyncio.gather(*light)  # the light key is quiet now, with a recent peak of 2
    heavy = [asyncio.create_task(_hold(queue, places, "heavy", order, heavy_go)) for _ in range(10)]
    await settle()
    # Without holding back, the heavy key would take all 8 and the light one would wait
    # for one of its requests to end.
    assert order.count("heavy") == 6 and queue.waiting == 4 and places.free == 2
    light_go.clear()
    late = asyncio.create_task(_hold(queue, places, "light", order, light_go))
    await settle()
    assert order[-1] == "light" and places.free == 1  # at once, not after a heavy one
    light_go.set()
    await late
    now[0] += fairqueue.DEMAND_WINDOW + 1  # the light key quiet for a window: places back
    queue.wake()
    await settle()
    assert order.count("heavy") == 8 and places.free == 0 and queue.waiting == 2
    heavy_go.set()
    await asyncio.gather(*heavy)
    assert places.free == 8 and queue.reserved() == {}


def test_a_recent_light_keys_places_are_held_for_it() -> None:
    asyncio.run(_a_recent_light_keys_places_are_held_for_it())


async def _a_key_alone_gets_every_place() -> None:
    places = Places(4)
    queue = FairQueue(places.has_room, timeout=30, places=lambda: 4)
    order: list[str] = []
    go = asyncio.Event()
    tasks = [asyncio.create_task(_hold(queue, places, "only", order, go)) for _ in range(5)]
    await settle()
    assert order == ["only"] * 4 and queue.waiting == 1
    go.set()
    await asyncio.gather(*tasks)


def test_a_key_alone_gets_every_place() -> None:
    asyncio.run(_a_key_alone_gets_every_place())
