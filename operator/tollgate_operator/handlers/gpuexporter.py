"""GPUExporter: the exporter DaemonSet on GPU nodes, its Service and ServiceMonitor."""

from __future__ import annotations

from typing import Any

import kopf

from .. import children
from ..client import DAEMONSETS, GPU_EXPORTERS, SERVICE_MONITORS, SERVICES, ApiError
from ..conditions import condition, merge_conditions, status_patch
from ..reconcile import NotOurs, ensure, plain, remove
from ..runtime import Runtime
from ..settings import GROUP, SETTINGS, VERSION

_errors: dict[tuple[str, str], str] = {}


@kopf.on.resume(GROUP, VERSION, "gpuexporters", backoff=5)
@kopf.on.create(GROUP, VERSION, "gpuexporters", backoff=5)
@kopf.on.update(GROUP, VERSION, "gpuexporters", backoff=5)
async def reconcile(body: kopf.Body, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    runtime: Runtime = memo.runtime
    gx = plain(body)
    ns, name, uid = gx["metadata"]["namespace"], gx["metadata"]["name"], gx["metadata"]["uid"]
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
        if _errors.get((ns, name)) != str(exc):
            kopf.warn(body, reason="ReconcileError", message=str(exc))
        _errors[(ns, name)] = str(exc)
        await refresh_status(runtime, ns, name)
        raise kopf.TemporaryError(str(exc), delay=5) from exc
    _errors.pop((ns, name), None)
    await refresh_status(runtime, ns, name)


@kopf.timer(GROUP, VERSION, "gpuexporters", interval=SETTINGS.status_interval)
async def refresh(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    await refresh_status(memo.runtime, namespace, name)


@kopf.on.delete(GROUP, VERSION, "gpuexporters")
def deleted(namespace: str, name: str, logger: Any, **_: Any) -> None:
    _errors.pop((namespace, name), None)
    logger.info("exporter %s deleted; its DaemonSet follows by owner reference", name)


async def refresh_status(runtime: Runtime, namespace: str, name: str) -> None:
    client = runtime.client
    async with runtime.locks[("gx", namespace, name)]:
        body = await client.get(GPU_EXPORTERS, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        generation = int(body["metadata"].get("generation") or 1)
        ds = await client.get(DAEMONSETS, namespace, children.exporter_name(name))
        ds_status = (ds or {}).get("status") or {}
        desired = int(ds_status.get("desiredNumberScheduled") or 0)
        ready = int(ds_status.get("numberReady") or 0)
        error = _errors.get((namespace, name))
        if error:
            cond = condition("Ready", False, "ReconcileError", error)
        elif desired == 0:
            cond = condition("Ready", False, "NoGPUNodes", "no node matches the node selector")
        else:
            cond = condition("Ready", ready >= desired, "Pods", f"{ready}/{desired} ready")
        current = body.get("status") or {}
        wanted = {
            "observedGeneration": generation,
            "desiredPods": desired,
            "readyPods": ready,
            "conditions": merge_conditions(current.get("conditions"), [cond], generation),
        }
        patch = status_patch(current, wanted)
        if patch:
            await client.patch(GPU_EXPORTERS, namespace, name, {"status": patch}, status=True)
