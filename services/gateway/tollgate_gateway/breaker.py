"""A circuit breaker for the upstream: closed, open, half-open.

Closed counts consecutive failures; at the threshold it opens, and for `open_seconds`
every request is refused at once (503) instead of waiting on an upstream that is down.
Then it is half-open: exactly one request goes through as a probe; its success closes
the breaker, its failure opens it again.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable

log = logging.getLogger("tollgate.breaker")


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int,
        open_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        name: str = "upstream",
    ) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.open_seconds = open_seconds
        self._clock = clock
        self._state = State.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False
        self.transitions: dict[tuple[str, str], int] = {}

    @property
    def state(self) -> State:
        if self._state is State.OPEN and self._clock() - self._opened_at >= self.open_seconds:
            self._transition(State.HALF_OPEN)
        return self._state

    def allow(self) -> bool:
        """Whether a request may go to the upstream now; a half-open yes is the probe."""
        state = self.state
        if state is State.CLOSED:
            return True
        if state is State.HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        return False

    def retry_after(self) -> float:
        return max(0.0, self.open_seconds - (self._clock() - self._opened_at))

    def success(self) -> None:
        self._failures = 0
        self._probe_in_flight = False
        if self._state is not State.CLOSED:
            self._transition(State.CLOSED)

    def failure(self) -> None:
        self._probe_in_flight = False
        self._failures += 1
        if self._state is State.HALF_OPEN or self._failures >= self.failure_threshold:
            self._opened_at = self._clock()
            if self._state is not State.OPEN:
                self._transition(State.OPEN)

    def release(self) -> None:
        """A request that ended without telling success from failure (client left)."""
        self._probe_in_flight = False

    def _transition(self, state: State) -> None:
        log.warning(
            "circuit breaker of %s: %s -> %s",
            self.name,
            self._state.value,
            state.value,
            extra={
                "event": "breaker",
                "upstream": self.name,
                "from": self._state.value,
                "to": state.value,
            },
        )
        pair = (self._state.value, state.value)
        self.transitions[pair] = self.transitions.get(pair, 0) + 1
        self._state = state
