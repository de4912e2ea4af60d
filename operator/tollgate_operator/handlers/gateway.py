"""InferenceGateway: the gateway's Deployment and friends, its config writer, its status.

One daemon per gateway runs two loops for as long as the gateway exists: the ConfigWriter
(the config Secret) and a Converger (ServiceAccount, Role, RoleBinding, Deployment, the API
and metrics Services, PodDisruptionBudget, NetworkPolicies, ServiceMonitor). The converger
is poked on every spec change and on every event of a child the gateway owns
(handlers/children.py), so a child deleted or edited by hand comes back within seconds.
No finalizer: everything the gateway made goes with it by owner reference.

Status is computed in one place (refresh_status): the gateway pods' readiness, the
children, and for an InferencePool upstream the writer's last resolution of the pool
(condition UpstreamResolved, status.upstreamEndpoints), refreshed by the writer whenever
that resolution changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, cast

import kopf

from .. import children
from ..client import (
    DEPLOYMENTS,
    GATEWAYS,
    NETWORK_POLICIES,
    PDBS,
    ROLE_BINDINGS,
    ROLES,
    SECRETS,
    SERVICE_ACCOUNTS,
    SERVICE_MONITORS,
    SERVICES,
    ApiError,
    Kind,
)
from ..conditions import condition, merge_conditions
from ..configdoc import GatewayView
from ..converge import Converger
from ..keys import decode
from ..pools import Resolution
from ..reconcile import NotOurs, ensure, plain, remove
from ..runtime import GatewayKey, Runtime
from ..settings import GROUP, SETTINGS, VERSION
from ..status import write_status
from ..usage import DayUsage
from ..writer import ConfigWriter

log = logging.getLogger(__name__)
# Whether the InferencePool upstream resolved (only on gateways whose upstream is a pool).
UPSTREAM_CONDITION = "UpstreamResolved"
_errors: dict[GatewayKey, str] = {}  # last reconcile error per gateway, for status
_usage_errors: dict[GatewayKey, str] = {}  # last usage read error, logged once


@kopf.index(GROUP, VERSION, "inferencegateways")
def gateways_by_name(body: kopf.Body, **_: Any) -> dict[tuple[str, str], GatewayView]:
    view = GatewayView.from_body(body)
    return {(view.namespace, view.name): view}


@kopf.on.event(GROUP, VERSION, "inferencegateways")
async def changed(
    type: str | None, namespace: str | None, name: str, uid: str, memo: Any, **_: Any
) -> None:
    """A spec change re-converges the children and re-writes the config. A deletion only
    forgets: the children go with the garbage collector, and the keys learn that their
    gateway left. (An event handler, not on.delete: that would make kopf keep state, and
    a finalizer, on every gateway.)"""
    assert namespace is not None  # every tollgate kind is namespaced
    runtime: Runtime = memo.runtime
    key = GatewayKey(namespace, name)
    if type == "DELETED":
        writer = runtime.writers.pop(key, None)
        runtime.usage.pop(key, None)
        _errors.pop(key, None)
        if writer is not None and runtime.key_status_hook is not None:
            await runtime.key_status_hook(namespace, [k.name for k in writer.api_keys()])
        return
    writer = runtime.writers.get(key)
    if writer is not None:
        writer.poke()  # e.g. defaultPolicy changed
    runtime.poke_owners([uid])


def desired_children(gw: dict[str, Any]) -> list[tuple[Kind, dict[str, Any] | None, str]]:
    """(kind, manifest or None to remove, child name): everything the gateway owns but
    its config Secret (the writer's)."""
    name = gw["metadata"]["name"]
    spec = gw.get("spec") or {}
    child = children.gateway_name(name)
    pdb_on = (spec.get("podDisruptionBudget") or {}).get("enabled", True)
    netpol_on = (spec.get("networkPolicy") or {}).get("enabled", True)
    upstream_selected = bool((spec.get("networkPolicy") or {}).get("upstreamPodSelector"))
    return [
        (SERVICE_ACCOUNTS, children.gateway_service_account(gw), child),
        (ROLES, children.gateway_role(gw), child),
        (ROLE_BINDINGS, children.gateway_role_binding(gw), child),
        (DEPLOYMENTS, children.gateway_deployment(gw), child),
        (SERVICES, children.gateway_service(gw), child),
        (SERVICES, children.gateway_metrics_service(gw), children.metrics_service_name(name)),
        (PDBS, children.gateway_pdb(gw) if pdb_on else None, child),
        (NETWORK_POLICIES, children.gateway_network_policy(gw) if netpol_on else None, child),
        (
            NETWORK_POLICIES,
            children.upstream_network_policy(gw) if netpol_on and upstream_selected else None,
            children.upstream_policy_name(name),
        ),
    ]


async def converge(runtime: Runtime, body: kopf.Body, logger: Any) -> None:
    """One pass over every child; errors go to status (Reconciled=False) and are raised
    so the converger retries."""
    gw = plain(body)
    ns, name, uid = gw["metadata"]["namespace"], gw["metadata"]["name"], gw["metadata"]["uid"]
    key = GatewayKey(ns, name)
    spec = gw.get("spec") or {}
    client = runtime.client
    try:
        for kind, manifest, child in desired_children(gw):
            if manifest is None:
                await remove(client, kind, ns, child, uid)
                continue
            result = await ensure(client, kind, manifest, uid)
            if result != "unchanged":
                logger.info("%s %s %s", kind.plural, child, result)
        if await client.served(SERVICE_MONITORS, SETTINGS.discovery_ttl):
            if (spec.get("monitoring") or {}).get("serviceMonitor", True):
                result = await ensure(
                    client, SERVICE_MONITORS, children.gateway_service_monitor(gw), uid
                )
                if result != "unchanged":
                    logger.info("servicemonitors %s %s", children.gateway_name(name), result)
            else:
                await remove(client, SERVICE_MONITORS, ns, children.gateway_name(name), uid)
    except (ApiError, NotOurs) as exc:
        if _errors.get(key) != str(exc):
            kopf.warn(body, reason="ReconcileError", message=str(exc))
        _errors[key] = str(exc)
        await refresh_status(runtime, ns, name)
        raise
    if key in _errors:
        del _errors[key]
        kopf.info(body, reason="Reconciled", message="children match the spec again")
    await refresh_status(runtime, ns, name)


@kopf.daemon(GROUP, VERSION, "inferencegateways", cancellation_timeout=2.0)
async def gateway_loops(
    body: kopf.Body,
    namespace: str | None,
    name: str,
    uid: str,
    memo: kopf.Memo,
    logger: Any,
    stopped: kopf.DaemonStopped,
    **kwargs: Any,
) -> None:
    """The config writer and the children's converger, for as long as the gateway
    exists (`body` is kopf's live view of it)."""
    gateways_by_name: kopf.Index[Any, Any] = kwargs["gateways_by_name"]
    apikeys_by_gateway: kopf.Index[Any, Any] = kwargs["apikeys_by_gateway"]
    policies_by_namespace: kopf.Index[Any, Any] = kwargs["policies_by_namespace"]
    assert namespace is not None  # every tollgate kind is namespaced
    runtime: Runtime = memo.runtime
    key = GatewayKey(namespace, name)
    writer = ConfigWriter(
        runtime, namespace, name, gateways_by_name, apikeys_by_gateway, policies_by_namespace
    )
    converger = Converger(f"gateway {namespace}/{name}", lambda: converge(runtime, body, logger))
    runtime.writers[key] = writer
    runtime.convergers[uid] = converger
    tasks = [
        asyncio.create_task(writer.run(), name=f"config-writer {namespace}/{name}"),
        asyncio.create_task(converger.run(), name=f"converger {namespace}/{name}"),
    ]
    try:
        await stopped.wait()
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if runtime.writers.get(key) is writer:
            del runtime.writers[key]
        if runtime.convergers.get(uid) is converger:
            del runtime.convergers[uid]


@kopf.timer(GROUP, VERSION, "inferencegateways", interval=SETTINGS.status_interval)
async def refresh(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Today's usage for the ApiKeys' status, and readiness."""
    runtime: Runtime = memo.runtime
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    await refresh_usage(runtime, body)
    await refresh_status(runtime, ns, name, body=plain(body))


async def _secret_value(runtime: Runtime, ns: str, ref: dict[str, Any], default: str) -> str | None:
    secret = await runtime.client.get(SECRETS, ns, ref["name"])
    return decode(secret, ref.get("key") or default) if secret else None


async def missing_secrets(runtime: Runtime, body: dict[str, Any]) -> list[str]:
    """The Secrets the gateway's pods need that are not there (or lack their key): the
    pods would not start, so status says so."""
    ns = body["metadata"]["namespace"]
    spec = body.get("spec") or {}
    refs = [
        ((spec.get("database") or {}).get("urlSecretRef"), "database-url"),
        ((spec.get("upstream") or {}).get("apiKeySecretRef"), "api-key"),
    ]
    missing = []
    for ref, default in refs:
        if not ref:
            continue
        field = ref.get("key") or default
        seen = runtime.secret_keys.get((ns, ref["name"]), ())
        if seen is not None and field in seen:
            continue  # the Secret watch has it: no read
        if not await _secret_value(runtime, ns, ref, default):
            missing.append(f"{ref['name']}/{field}")
    return missing


async def refresh_usage(runtime: Runtime, body: kopf.Body) -> None:
    key = GatewayKey(body["metadata"]["namespace"], body["metadata"]["name"])
    ref = ((body.get("spec") or {}).get("database") or {}).get("urlSecretRef")
    writer = runtime.writers.get(key)
    if writer is None:
        return
    names = sorted(k.name for k in writer.api_keys() if not k.deleting)
    if not ref:
        runtime.usage.pop(key, None)
        return
    url = await _secret_value(runtime, key.namespace, ref, "database-url")
    if not url:
        return  # reported in status (SecretMissing)
    try:
        usage = await runtime.usage_reader.today(url, names)
    except Exception as exc:  # the store being down must never break reconciling
        if _usage_errors.get(key) != str(exc):  # once per distinct error, not per interval
            log.warning("gateway %s/%s: usage not read: %s", key.namespace, key.name, exc)
        _usage_errors[key] = str(exc)
        return
    if _usage_errors.pop(key, None) is not None:
        log.info("gateway %s/%s: usage read again", key.namespace, key.name)
    before = runtime.usage.get(key, DayUsage(usage.day))
    runtime.usage[key] = usage
    changed = [
        n for n in names if before.day != usage.day or before.keys.get(n) != usage.keys.get(n)
    ]
    if changed and runtime.key_status_hook is not None:
        await runtime.key_status_hook(key.namespace, changed)


async def refresh_status(
    runtime: Runtime, namespace: str, name: str, *, body: dict[str, Any] | None = None
) -> None:
    """With `body` (the timer's: kopf's watched copy) nothing is read when the watches
    have delivered the Deployment and the referenced Secrets."""
    dep_status = await runtime.workload_status(DEPLOYMENTS, namespace, children.gateway_name(name))
    given = body
    if body is None:
        body = await runtime.client.get(GATEWAYS, namespace, name)
    missing = await missing_secrets(runtime, body) if body is not None else []
    error = _errors.get(GatewayKey(namespace, name))
    writer = runtime.writers.get(GatewayKey(namespace, name))
    resolution = writer.resolution if writer is not None else None

    def compute(body: dict[str, Any]) -> dict[str, Any]:
        generation = int(body["metadata"].get("generation") or 1)
        desired = int((body.get("spec") or {}).get("replicas", 2))
        ready = int((dep_status or {}).get("readyReplicas") or 0)
        if missing:
            available = condition(
                "Ready", False, "SecretMissing", "missing Secret keys: " + ", ".join(missing)
            )
        elif ready >= desired and desired > 0:
            available = condition("Ready", True, "AllReplicasReady", f"{ready}/{desired} ready")
        elif desired == 0:
            available = condition("Ready", False, "ScaledToZero", "spec.replicas is 0")
        else:
            available = condition("Ready", False, "Progressing", f"{ready}/{desired} ready")
        if error:
            reconciled = condition("Reconciled", False, "ReconcileError", error)
        elif missing:
            reconciled = condition(
                "Reconciled",
                False,
                "SecretMissing",
                "the pods need Secret keys that are not there: " + ", ".join(missing),
            )
        else:
            reconciled = condition("Reconciled", True, "ChildrenReady", "children match the spec")
        current = body.get("status") or {}
        selector = ",".join(
            f"{k}={v}" for k, v in children.selector_labels("gateway", name).items()
        )
        wanted = [available, reconciled]
        endpoints, upstream = _upstream_status(body, resolution)
        if upstream is not None:
            wanted.append(upstream)
        return {
            "observedGeneration": generation,
            "replicas": int((dep_status or {}).get("replicas") or 0),
            "readyReplicas": ready,
            "selector": selector,
            "upstreamEndpoints": endpoints,
            "conditions": merge_conditions(current.get("conditions"), wanted, generation),
        }

    seen = await write_status(runtime, GATEWAYS, namespace, name, compute, body=given)
    if seen is not None and resolution is not None:
        was = _condition(seen, UPSTREAM_CONDITION).get("reason")
        if was != resolution.reason:
            kopf.event(
                cast(kopf.Body, seen),
                type="Normal" if resolution.resolved else "Warning",
                reason=resolution.reason,
                message=resolution.message,
            )


def _upstream_status(
    body: dict[str, Any], resolution: Resolution | None
) -> tuple[int | None, dict[str, Any] | None]:
    """(status.upstreamEndpoints, the UpstreamResolved condition) of a gateway whose
    upstream is an InferencePool; (None, None) for any other. Before the writer's first
    pass since a start, what status already says is kept (no flapping write)."""
    if not ((body.get("spec") or {}).get("upstream") or {}).get("inferencePool"):
        return None, None
    if resolution is not None:
        ok, reason, message = resolution.resolved, resolution.reason, resolution.message
        return len(resolution.upstreams), condition(UPSTREAM_CONDITION, ok, reason, message)
    old = _condition(body, UPSTREAM_CONDITION)
    if not old:
        return None, None
    kept: dict[str, Any] = {k: old[k] for k in ("type", "status", "reason", "message") if k in old}
    return (body.get("status") or {}).get("upstreamEndpoints"), kept


def _condition(body: dict[str, Any], type_: str) -> dict[str, Any]:
    conditions = (body.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == type_), {})
