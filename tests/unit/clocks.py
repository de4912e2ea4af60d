"""A clock for the unit tests: time moves only when a test says so, so no result depends
on how busy the machine is."""

from __future__ import annotations


class ManualClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
