"""A parent's children, converged whenever anything may have moved them.

One `Converger` per InferenceGateway or GPUExporter, run by that object's daemon. It is
poked when the parent's spec changes and on every event of a child it owns (a child
deleted or edited by hand is put back within seconds, not at a periodic resync). Failures
are retried after `retry_delay`; the step itself reports them in status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from . import metrics

log = logging.getLogger(__name__)


class Converger:
    def __init__(
        self,
        what: str,
        step: Callable[[], Awaitable[None]],
        retry_delay: float = 5.0,
        *,
        kind: str = "InferenceGateway",
    ) -> None:
        self.what = what
        self.kind = kind
        self._step = step
        self._retry_delay = retry_delay
        self._dirty = asyncio.Event()
        self.runs = 0

    def poke(self) -> None:
        self._dirty.set()
        metrics.set_pending(self.kind, self.what, True)

    async def run(self) -> None:
        """Until cancelled (the parent is gone or the operator stops)."""
        self.poke()  # converge once at start
        try:
            await self._loop()
        finally:
            metrics.set_pending(self.kind, self.what, None)

    async def _loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            self.runs += 1
            try:
                with metrics.reconcile(self.kind):
                    await self._step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # reported in status by the step; retried here
                log.debug("%s: not converged (%s); retrying", self.what, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._dirty.wait(), self._retry_delay)
                self._dirty.set()
                continue
            if not self._dirty.is_set():
                metrics.set_pending(self.kind, self.what, False)
