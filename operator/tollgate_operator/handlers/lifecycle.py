"""Operator start and stop: kopf settings, the API client, the shared runtime."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import kopf

from ..client import KubeClient
from ..database_secret import PostgresSecret
from ..database_secret import ensure as ensure_postgres_secret
from ..runtime import Runtime
from ..settings import FINALIZER, GROUP
from . import apikey, gateway


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Our own names for kopf's bookkeeping, so `kubectl get -o yaml` says who wrote it.
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # The resources are known at start (the chart installs the CRDs first); scanning for
    # new CRDs and namespaces would need cluster-wide list/watch on both.
    settings.scanning.disabled = True
    settings.posting.level = logging.INFO
    settings.posting.reporting_component = "tollgate-operator"
    settings.execution.max_workers = 4
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 30
    settings.peering.standalone = True
    runtime = Runtime(await KubeClient.connect())
    postgres = PostgresSecret.from_env()
    if postgres is not None:
        await ensure_postgres_secret(runtime.client, postgres)

    async def refresh_keys(namespace: str, names: Iterable[str]) -> None:
        await apikey.refresh_many(runtime, namespace, names)

    async def refresh_gateway(namespace: str, name: str) -> None:
        await gateway.refresh_status(runtime, namespace, name)

    runtime.key_status_hook = refresh_keys
    runtime.gateway_status_hook = refresh_gateway
    memo.runtime = runtime


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    runtime = getattr(memo, "runtime", None)
    if runtime is not None:
        await runtime.close()
