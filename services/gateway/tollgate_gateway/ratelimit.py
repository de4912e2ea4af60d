"""The per-IP rate limit (GCRA), and which IP a request comes from.

GCRA keeps one number per client, its theoretical arrival time: a request is allowed when
that time is at most `burst - 1` emission intervals ahead of now, and moves it one
interval further. Exact for any burst, O(1), no timers. It protects each replica, so it
is local by design; the workers of one replica share it (`podshare.RateTable`), whose
fixed table forgets a client once it is back at a full burst.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterable

from tollgate_gateway.podshare import RateTable


class Gcra:
    """Times are integer microseconds. In float seconds at a clock's usual size (1e5 s of
    uptime, 1.8e9 s since the epoch) `tat - now` picks up rounding error, and a burst's
    last request, due exactly at the tolerance, was refused by a few nanoseconds. A clock
    reading in microseconds is exact below 9e9 s (2**53 µs), and cheap."""

    def __init__(
        self,
        rate_per_second: float,
        burst: int,
        table: RateTable,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`clock` must read the same in every worker sharing `table` (monotonic does)."""
        self._interval = max(1, round(1e6 / rate_per_second))
        self._tolerance = self._interval * (max(1, burst) - 1)
        self._table = table
        self._clock = clock

    @property
    def clients(self) -> int:
        """Clients not yet back at a full burst."""
        return self._table.clients(self._now())

    def _now(self) -> int:
        return round(self._clock() * 1e6)

    def check(self, client: str) -> float:
        """0 if allowed (and counted), else the seconds until the client may retry."""
        table = self._table
        with table.lock:
            # Read inside the lock: a worker descheduled between reading the clock and
            # taking the lock would judge by a time other workers have already passed.
            now = self._now()
            slot, tat = table.slot(client, now)
            tat = max(tat, now)
            if tat - now > self._tolerance:
                return (tat - self._tolerance - now) / 1e6
            table.set_tat(slot, tat + self._interval)
        return 0.0


class ClientAddress:
    """The client's IP: the peer's, or from X-Forwarded-For when the peer is a trusted
    proxy (then the right-most address that is not itself a trusted proxy)."""

    def __init__(self, trusted_cidrs: Iterable[str]) -> None:
        self.trusted = [ipaddress.ip_network(c.strip(), strict=False) for c in trusted_cidrs]

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.strip())
        except ValueError:
            return False
        return any(ip in network for network in self.trusted)

    def of(self, peer: str, forwarded_for: bytes | None) -> str:
        if not self.trusted or not forwarded_for or not self._is_trusted(peer):
            return peer
        hops = [h.strip() for h in forwarded_for.decode("latin-1").split(",") if h.strip()]
        for hop in reversed(hops):
            if not self._is_trusted(hop):
                try:
                    return str(ipaddress.ip_address(hop))
                except ValueError:
                    return peer  # garbage in the header: fall back to what we know
        return hops[0] if hops else peer
