"""The embedded Postgres' password, generated once by the operator.

A password rendered by the chart changes on every `helm template` (Helm's `lookup` is empty
under Argo CD and Flux): the Secret would churn while Postgres keeps its first password,
and the gateways would stop authenticating. So the chart names the Secret and the operator
creates it, once: it never rewrites an existing one (rotate by hand, in Postgres too). The
Secret has no owner, so it survives `helm uninstall` like the data volume, and a re-install
opens the same data.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
from dataclasses import dataclass

from .client import SECRETS, ApiError, KubeClient
from .settings import MANAGED_BY

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PostgresSecret:
    namespace: str
    name: str
    host: str
    user: str
    database: str

    @classmethod
    def from_env(cls) -> PostgresSecret | None:
        """Set by the chart when database.mode is embedded; None otherwise."""
        name = os.environ.get("TOLLGATE_POSTGRES_SECRET")
        if not name:
            return None
        return cls(
            namespace=os.environ["TOLLGATE_OPERATOR_NAMESPACE"],
            name=name,
            host=os.environ["TOLLGATE_POSTGRES_HOST"],
            user=os.environ.get("TOLLGATE_POSTGRES_USER", "tollgate"),
            database=os.environ.get("TOLLGATE_POSTGRES_DB", "tollgate"),
        )

    def manifest(self, password: str) -> dict[str, object]:
        url = f"postgresql://{self.user}:{password}@{self.host}:5432/{self.database}"
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {
                    "app.kubernetes.io/part-of": "tollgate",
                    "app.kubernetes.io/component": "database",
                    "app.kubernetes.io/created-by": MANAGED_BY,
                },
            },
            "type": "Opaque",
            "data": {
                "password": base64.b64encode(password.encode()).decode(),
                "database-url": base64.b64encode(url.encode()).decode(),
            },
        }


async def ensure(client: KubeClient, wanted: PostgresSecret) -> bool:
    """Create the Secret when it is missing; True when this call created it."""
    if await client.get(SECRETS, wanted.namespace, wanted.name) is not None:
        return False
    try:
        await client.create(SECRETS, wanted.namespace, wanted.manifest(secrets.token_urlsafe(24)))
    except ApiError as exc:
        if exc.status == 409:
            return False  # another operator replica made it first
        raise
    log.info("generated the Postgres password Secret %s/%s", wanted.namespace, wanted.name)
    return True
