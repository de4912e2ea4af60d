"""InferenceGateway: the gateway's Deployment and friends, its config writer, its status.

Children (ServiceAccount, Role, RoleBinding, Deployment, Service, PodDisruptionBudget,
ServiceMonitor) are converged on create/update/resume; the config Secret belongs to the
per-gateway ConfigWriter daemon; a timer refreshes readiness and today's usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import kopf

from .. import children
from ..client import (
    DEPLOYMENTS,
    GATEWAYS,
    PDBS,
    ROLE_BINDINGS,
    ROLES,
    SECRETS,
    SERVICE_ACCOUNTS,
    SERVICE_MONITORS,
    SERVICES,
    ApiError,
    Kind,
    KubeClient,
)
from ..conditions import condition, merge_conditions, status_patch
from ..configdoc import GatewayView
from ..keys import decode
from ..reconcile import NotOurs, ensure, plain, remove
from ..runtime import Runtime
from ..settings import GROUP, SETTINGS, VERSION
from ..writer import ConfigWriter

log = logging.getLogger(__name__)
_errors: dict[tuple[str, str], str] = {}  # last reconcile error per gateway, for status


@kopf.index(GROUP, VERSION, "inferencegateways")
def gateways_by_name(body: kopf.Body, **_: Any) -> dict[tuple[str, str], GatewayView]:
    view = GatewayView.from_body(body)
    return {(view.namespace, view.name): view}


@kopf.on.event(GROUP, VERSION, "inferencegateways")
def changed(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    writer = memo.runtime.writers.get((namespace, name))
    if writer is not None:
        writer.poke()  # e.g. defaultPolicy changed


@kopf.on.resume(GROUP, VERSION, "inferencegateways", backoff=5)
@kopf.on.create(GROUP, VERSION, "inferencegateways", backoff=5)
@kopf.on.update(GROUP, VERSION, "inferencegateways", backoff=5)
async def reconcile(body: kopf.Body, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    runtime: Runtime = memo.runtime
    gw = _as_dict(body)
    ns, name, uid = gw["metadata"]["namespace"], gw["metadata"]["name"], gw["metadata"]["uid"]
    spec = gw.get("spec") or {}
    client = runtime.client
    try:
        for kind, manifest in (
            (SERVICE_ACCOUNTS, children.gateway_service_account(gw)),
            (ROLES, children.gateway_role(gw)),
            (ROLE_BINDINGS, children.gateway_role_binding(gw)),
            (DEPLOYMENTS, children.gateway_deployment(gw)),
            (SERVICES, children.gateway_service(gw)),
        ):
            await _converge(kind, manifest, uid, body, logger, client)
        child = children.gateway_name(name)
        if (spec.get("podDisruptionBudget") or {}).get("enabled", True):
            await _converge(PDBS, children.gateway_pdb(gw), uid, body, logger, client)
        else:
            await remove(client, PDBS, ns, child, uid)
        if await client.served(SERVICE_MONITORS, SETTINGS.discovery_ttl):
            if (spec.get("monitoring") or {}).get("serviceMonitor", True):
                manifest = children.gateway_service_monitor(gw)
                await _converge(SERVICE_MONITORS, manifest, uid, body, logger, client)
            else:
                await remove(client, SERVICE_MONITORS, ns, child, uid)
    except (ApiError, NotOurs) as exc:
        if _errors.get((ns, name)) != str(exc):
            kopf.warn(body, reason="ReconcileError", message=str(exc))
        _errors[(ns, name)] = str(exc)
        await refresh_status(runtime, ns, name)
        raise kopf.TemporaryError(str(exc), delay=5) from exc
    _errors.pop((ns, name), None)
    writer = runtime.writers.get((ns, name))
    if writer is not None:
        writer.poke()
    await refresh_status(runtime, ns, name)


async def _converge(
    kind: Kind,
    manifest: dict[str, Any],
    uid: str,
    body: kopf.Body,
    logger: Any,
    client: KubeClient,
) -> None:
    result = await ensure(client, kind, manifest, uid)
    if result != "unchanged":
        logger.info("%s %s %s", kind.plural, manifest["metadata"]["name"], result)


@kopf.daemon(GROUP, VERSION, "inferencegateways", cancellation_timeout=2.0)
async def config_writer(
    namespace: str,
    name: str,
    memo: kopf.Memo,
    gateways_by_name: kopf.Index,
    apikeys_by_gateway: kopf.Index,
    policies_by_namespace: kopf.Index,
    stopped: kopf.DaemonStopped,
    **_: Any,
) -> None:
    """Owns the config Secret of this gateway for as long as the gateway exists."""
    runtime: Runtime = memo.runtime
    writer = ConfigWriter(
        runtime, namespace, name, gateways_by_name, apikeys_by_gateway, policies_by_namespace
    )
    runtime.writers[(namespace, name)] = writer
    task = asyncio.create_task(writer.run(), name=f"config-writer {namespace}/{name}")
    try:
        await stopped.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if runtime.writers.get((namespace, name)) is writer:
            del runtime.writers[(namespace, name)]


@kopf.timer(GROUP, VERSION, "inferencegateways", interval=SETTINGS.status_interval)
async def refresh(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Readiness from the Deployment, and today's usage for the ApiKeys' status."""
    runtime: Runtime = memo.runtime
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    await refresh_usage(runtime, body)
    await refresh_status(runtime, ns, name)


@kopf.on.delete(GROUP, VERSION, "inferencegateways")
async def deleted(body: kopf.Body, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    """Children go with the garbage collector; the keys learn that their gateway left."""
    runtime: Runtime = memo.runtime
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    writer = runtime.writers.pop((ns, name), None)
    runtime.usage.pop((ns, name), None)
    _errors.pop((ns, name), None)
    if writer is not None and runtime.key_status_hook is not None:
        await runtime.key_status_hook(ns, [k.name for k in writer.api_keys()])
    logger.info("gateway %s deleted; its children follow by owner reference", name)


async def refresh_usage(runtime: Runtime, body: kopf.Body) -> None:
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    ref = ((body.get("spec") or {}).get("database") or {}).get("urlSecretRef")
    writer = runtime.writers.get((ns, name))
    if writer is None:
        return
    names = sorted(k.name for k in writer.api_keys() if not k.deleting)
    if not ref:
        usage: dict[str, Any] = {}
    else:
        secret = await runtime.client.get(SECRETS, ns, ref["name"])
        url = decode(secret, ref.get("key") or "database-url") if secret else None
        if not url:
            log.warning("gateway %s/%s: database Secret %s unreadable", ns, name, ref["name"])
            return
        try:
            usage = await runtime.usage_reader.today(url, names)
        except Exception as exc:  # the store being down must never break reconciling
            log.warning("gateway %s/%s: usage not read: %s", ns, name, exc)
            return
    before = runtime.usage.get((ns, name), {})
    runtime.usage[(ns, name)] = usage
    changed = [n for n in names if before.get(n) != usage.get(n)]
    if changed and runtime.key_status_hook is not None:
        await runtime.key_status_hook(ns, changed)


async def refresh_status(runtime: Runtime, namespace: str, name: str) -> None:
    client = runtime.client
    async with runtime.locks[("gw", namespace, name)]:
        body = await client.get(GATEWAYS, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        generation = int(body["metadata"].get("generation") or 1)
        deployment = await client.get(DEPLOYMENTS, namespace, children.gateway_name(name))
        dep_status = (deployment or {}).get("status") or {}
        desired = int((body.get("spec") or {}).get("replicas", 2))
        ready = int(dep_status.get("readyReplicas") or 0)
        error = _errors.get((namespace, name))
        if ready >= desired and desired > 0:
            available = condition("Ready", True, "AllReplicasReady", f"{ready}/{desired} ready")
        elif desired == 0:
            available = condition("Ready", False, "ScaledToZero", "spec.replicas is 0")
        else:
            available = condition("Ready", False, "Progressing", f"{ready}/{desired} ready")
        reconciled = (
            condition("Reconciled", False, "ReconcileError", error)
            if error
            else condition("Reconciled", True, "ChildrenReady", "children match the spec")
        )
        current = body.get("status") or {}
        wanted = {
            "observedGeneration": generation,
            "replicas": int(dep_status.get("replicas") or 0),
            "readyReplicas": ready,
            "conditions": merge_conditions(
                current.get("conditions"), [available, reconciled], generation
            ),
        }
        patch = status_patch(current, wanted)
        if patch:
            await client.patch(GATEWAYS, namespace, name, {"status": patch}, status=True)


def _as_dict(body: kopf.Body) -> dict[str, Any]:
    return plain(body)
