"""Both event loops for tests of the gateway's protocols: the gateway runs on uvloop,
whose transports differ from asyncio's. A test module takes the fixture and runs its
coroutines with `run`:

    from loops import event_loop_kind, run  # noqa: F401 (the fixture)
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest

_LOOP = ["asyncio"]


@pytest.fixture(autouse=True, params=["asyncio", "uvloop"])
def event_loop_kind(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test of the module on both loops."""
    _LOOP[0] = request.param
    yield request.param
    _LOOP[0] = "asyncio"


def run(coro: Coroutine[Any, Any, None]) -> None:
    """`coro` to its end on the test's loop."""
    if _LOOP[0] == "uvloop":
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)
