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
