"""GPUExporter: the exporter DaemonSet on GPU nodes, its Service and ServiceMonitor.

Like the gateway: a daemon per exporter runs a Converger, poked on spec changes and on
child events; no finalizer (the children go with the garbage collector).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import kopf

from .. import children
from ..client import DAEMONSETS, GPU_EXPORTERS, SERVICE_MONITORS, SERVICES, ApiError
from ..conditions import condition, merge_conditions
from ..converge import Converger
from ..reconcile import NotOurs, ensure, plain, remove
from ..runtime import ObjectKey, Runtime
from ..settings import GROUP, SETTINGS, VERSION
from ..status import write_status

_errors: dict[ObjectKey, str] = {}


@kopf.on.event(GROUP, VERSION, "gpuexporters")
def changed(
    type: str | None, namespace: str | None, name: str, uid: str, memo: Any, **_: Any
) -> None:
    """Spec changes re-converge; a deletion only forgets (no on.delete: no kopf state)."""
    assert namespace is not None  # every tollgate kind is namespaced
    if type == "DELETED":
        _errors.pop(ObjectKey(GPU_EXPORTERS, namespace, name), None)
        return
    memo.runtime.poke_owners([uid])


async def converge(runtime: Runtime, body: kopf.Body, logger: Any) -> None:
    gx = plain(body)
    ns, name, uid = gx["metadata"]["namespace"], gx["metadata"]["name"], gx["metadata"]["uid"]
    key = ObjectKey(GPU_EXPORTERS, ns, name)
    client = runtime.client
    try:
        for kind, manifest in (
            (DAEMONSETS, children.exporter_daemonset(gx)),
            (SERVICES, children.exporter_service(gx)),
        ):
            result = await ensure(client, kind, manifest, uid)
            if result != "unchanged":
                logger.info("%s %s %s", kind.plural, manifest["metadata"]["name"], result)
        if await client.served(SERVICE_MONITORS, SETTINGS.discovery_ttl):
            if ((gx.get("spec") or {}).get("monitoring") or {}).get("serviceMonitor", True):
                await ensure(client, SERVICE_MONITORS, children.exporter_service_monitor(gx), uid)
            else:
                await remove(client, SERVICE_MONITORS, ns, children.exporter_name(name), uid)
    except (ApiError, NotOurs) as exc:
        if _errors.get(key) != str(exc):
            kopf.warn(body, reason="ReconcileError", message=str(exc))
        _errors[key] = str(exc)
        await refresh_status(runtime, ns, name)
        raise
    _errors.pop(key, None)
    await refresh_status(runtime, ns, name)


@kopf.daemon(GROUP, VERSION, "gpuexporters", cancellation_timeout=2.0)
async def exporter_loop(
    body: kopf.Body,
    namespace: str | None,
    name: str,
    uid: str,
    memo: kopf.Memo,
    logger: Any,
    stopped: kopf.DaemonStopped,
    **_: Any,
) -> None:
    assert namespace is not None  # every tollgate kind is namespaced
    runtime: Runtime = memo.runtime
    converger = Converger(
        f"exporter {namespace}/{name}",
        lambda: converge(runtime, body, logger),
        kind="GPUExporter",
    )
    runtime.convergers[uid] = converger
    task = asyncio.create_task(converger.run(), name=f"converger {namespace}/{name}")
    try:
        await stopped.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if runtime.convergers.get(uid) is converger:
            del runtime.convergers[uid]


@kopf.timer(GROUP, VERSION, "gpuexporters", interval=SETTINGS.status_interval)
async def refresh(
    body: kopf.Body, namespace: str | None, name: str, memo: kopf.Memo, **_: Any
) -> None:
    """From kopf's copy of the exporter and the DaemonSet's watch: no read."""
    assert namespace is not None  # every tollgate kind is namespaced
    await refresh_status(memo.runtime, namespace, name, body=plain(body))


async def refresh_status(
    runtime: Runtime, namespace: str, name: str, *, body: dict[str, Any] | None = None
) -> None:
    ds_status = await runtime.workload_status(DAEMONSETS, namespace, children.exporter_name(name))
    error = _errors.get(ObjectKey(GPU_EXPORTERS, namespace, name))

    def compute(body: dict[str, Any]) -> dict[str, Any]:
        generation = int(body["metadata"].get("generation") or 1)
        ds_status_ = ds_status or {}
        desired = int(ds_status_.get("desiredNumberScheduled") or 0)
        ready = int(ds_status_.get("numberReady") or 0)
        if error:
            cond = condition("Ready", False, "ReconcileError", error)
        elif desired == 0:
            cond = condition("Ready", False, "NoGPUNodes", "no node matches the node selector")
        else:
            cond = condition("Ready", ready >= desired, "Pods", f"{ready}/{desired} ready")
        current = body.get("status") or {}
        return {
            "observedGeneration": generation,
            "desiredPods": desired,
            "readyPods": ready,
            "conditions": merge_conditions(current.get("conditions"), [cond], generation),
        }

    await write_status(runtime, GPU_EXPORTERS, namespace, name, compute, body=body)
