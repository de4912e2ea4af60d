"""Fast in-process tests of the gateway's parts: no processes, no network, no sleeping.

Anything that reads time gets a `ManualClock` (clocks.py; not defined here, because
`conftest` is a module name every test folder has).
"""

from __future__ import annotations

import pytest
from clocks import ManualClock


@pytest.fixture
def clock() -> ManualClock:
    # A realistic magnitude (a wall clock in 2026): float rounding shows at this size.
    return ManualClock(1_795_000_000.0)
