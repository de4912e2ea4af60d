"""Leader election with a coordination.k8s.io/v1 Lease, as client-go's leaderelection does.

Every replica runs this before kopf starts; only the holder of the Lease runs kopf (the
others hold no watches, make no writes: they only read the Lease every `retry_period`).

- A candidate takes the Lease when it does not exist (create), names nobody, or has not
  been renewed for `lease_duration` *as observed by this replica's own clock* (the time the
  record was last seen to change, never the holder's timestamps: no clock-skew trust).
- Every write is an update with the resourceVersion just read, so two candidates that race
  for an expired Lease cannot both win: the API server answers the loser 409 Conflict.
- The leader renews every `retry_period`; when it has not renewed for `renew_deadline`
  (< lease_duration, so it stops before anyone else may take over) it has lost leadership
  and the process stops kopf and exits (the pod restarts as a candidate).
- On a clean stop (SIGTERM) the leader releases the Lease (holderIdentity emptied) after
  kopf has stopped, so a rolling update hands over at once rather than after a lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

from .client import ApiError, Kind, KubeClient

log = logging.getLogger(__name__)

LEASES = Kind("coordination.k8s.io", "v1", "leases")
_SA_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw else default


def _micro_now() -> str:
    now = datetime.datetime.now(datetime.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class ElectionConfig:
    namespace: str
    name: str = "tollgate-operator"
    identity: str = ""
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    @classmethod
    def from_env(cls) -> ElectionConfig:
        namespace = os.environ.get("TOLLGATE_OPERATOR_NAMESPACE", "")
        if not namespace and os.path.exists(_SA_NAMESPACE):
            with open(_SA_NAMESPACE) as f:
                namespace = f.read().strip()
        pod = os.environ.get("POD_NAME") or socket.gethostname()
        config = cls(
            namespace=namespace or "default",
            name=os.environ.get("TOLLGATE_LEASE_NAME") or cls.name,
            # The pod name alone is reused by a restarted container: a suffix tells them apart.
            identity=f"{pod}_{uuid.uuid4().hex[:8]}",
            lease_duration=_float("TOLLGATE_LEASE_DURATION", cls.lease_duration),
            renew_deadline=_float("TOLLGATE_LEASE_RENEW_DEADLINE", cls.renew_deadline),
            retry_period=_float("TOLLGATE_LEASE_RETRY_PERIOD", cls.retry_period),
        )
        if not config.retry_period < config.renew_deadline < config.lease_duration:
            raise ValueError("need retry period < renew deadline < lease duration")
        return config


class LeaderElector:
    def __init__(self, client: KubeClient, config: ElectionConfig) -> None:
        self.client = client
        self.config = config
        self.leading = False
        # monotonic time of the last answer from the API server (health), and of the last
        # successful acquire/renew (leadership).
        self.last_contact: float | None = None
        self._last_renew = 0.0
        self._observed: tuple[str, str] | None = None  # (holder, renewTime) last seen
        self._observed_at = 0.0
        self.transitions = 0

    # ---- one attempt --------------------------------------------------------------------

    async def try_acquire_or_renew(self) -> bool:
        cfg = self.config
        now = time.monotonic()
        try:
            lease = await self.client.get(LEASES, cfg.namespace, cfg.name)
        except ApiError as exc:
            log.warning("lease %s/%s: %s", cfg.namespace, cfg.name, exc)
            return False
        self.last_contact = time.monotonic()
        stamp = _micro_now()
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": cfg.name, "namespace": cfg.namespace},
                "spec": self._spec(stamp, stamp, 0),
            }
            try:
                await self.client.create(LEASES, cfg.namespace, body)
            except ApiError as exc:
                if exc.status != 409:
                    log.warning("lease %s/%s: %s", cfg.namespace, cfg.name, exc)
                return False
            return self._won(now)
        spec: dict[str, Any] = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, str(spec.get("renewTime") or ""))
        if record != self._observed:
            self._observed, self._observed_at = record, now
        duration = float(spec.get("leaseDurationSeconds") or cfg.lease_duration)
        if holder and holder != cfg.identity and now < self._observed_at + duration:
            return False  # someone else holds it and keeps renewing
        transitions = int(spec.get("leaseTransitions") or 0)
        if holder == cfg.identity:
            acquired = str(spec.get("acquireTime") or stamp)
        else:
            acquired, transitions = stamp, transitions + (1 if holder else 0)
        body = {
            **lease,
            "metadata": {**lease["metadata"]},  # keeps the resourceVersion just read
            "spec": self._spec(acquired, stamp, transitions),
        }
        try:
            await self.client.update(LEASES, cfg.namespace, cfg.name, body)
        except ApiError as exc:
            if exc.status != 409:
                log.warning("lease %s/%s: %s", cfg.namespace, cfg.name, exc)
            return False  # 409: another candidate wrote first
        return self._won(now)

    def _spec(self, acquired: str, renewed: str, transitions: int) -> dict[str, Any]:
        return {
            "holderIdentity": self.config.identity,
            "leaseDurationSeconds": max(1, round(self.config.lease_duration)),
            "acquireTime": acquired,
            "renewTime": renewed,
            "leaseTransitions": transitions,
        }

    def _won(self, started: float) -> bool:
        self.last_contact = time.monotonic()
        self._last_renew = started
        return True

    # ---- loops --------------------------------------------------------------------------

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Until this replica leads (True) or `stop` is set (False)."""
        first = True
        while not stop.is_set():
            try:
                won = await asyncio.wait_for(
                    self.try_acquire_or_renew(), self.config.renew_deadline
                )
            except TimeoutError:
                won = False
            if won:
                self.leading = True
                self.transitions += 1
                log.info(
                    "leading as %s (lease %s/%s)",
                    self.config.identity,
                    self.config.namespace,
                    self.config.name,
                )
                return True
            if first:
                log.info(
                    "standing by as %s: lease %s/%s is held by %s",
                    self.config.identity,
                    self.config.namespace,
                    self.config.name,
                    (self._observed or ("?",))[0] or "nobody",
                )
                first = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.retry_period)
        return False

    async def keep(self, stop: asyncio.Event) -> None:
        """While leading: renew every retry period; return once leadership is lost (not
        renewed within the renew deadline) or `stop` is set."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.config.retry_period)
                return
            except TimeoutError:
                pass
            try:
                renewed = await asyncio.wait_for(
                    self.try_acquire_or_renew(), self.config.renew_deadline
                )
            except TimeoutError:
                renewed = False
            if not renewed and time.monotonic() - self._last_renew > self.config.renew_deadline:
                self.leading = False
                log.error(
                    "lost the lease %s/%s (not renewed for %.0f s): stopping",
                    self.config.namespace,
                    self.config.name,
                    self.config.renew_deadline,
                )
                return

    async def release(self) -> None:
        """Empty the holder (only if it is still us), so the next replica need not wait."""
        if not self.leading:
            return
        self.leading = False
        cfg = self.config
        try:
            lease = await self.client.get(LEASES, cfg.namespace, cfg.name)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != cfg.identity:
                return
            spec = {**lease["spec"], "holderIdentity": "", "leaseDurationSeconds": 1}
            await self.client.update(LEASES, cfg.namespace, cfg.name, {**lease, "spec": spec})
            log.info("released the lease %s/%s", cfg.namespace, cfg.name)
        except ApiError as exc:
            log.warning("could not release the lease %s/%s: %s", cfg.namespace, cfg.name, exc)
