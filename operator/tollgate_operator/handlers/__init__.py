"""kopf handlers, one module per kind; importing this package registers them all.

No tollgate object carries a finalizer: deletion needs no work outside the garbage
collector (children go by owner reference; a deleted ApiKey is revoked by the writer's next
pass, which no longer finds it in the index). kopf hard-codes a finalizer for every daemon
and timer, so that it can stop them before the object goes; ours only converge and refresh
status, and stopping them when the DELETED event arrives loses nothing. Without finalizers
a namespace deletion or `helm uninstall` never waits for the operator (docs/operator.md).
"""

from __future__ import annotations

import dataclasses

import kopf

from . import apikey, children, gateway, gpuexporter, inferencepool, lifecycle, quotapolicy

__all__ = [
    "apikey",
    "children",
    "gateway",
    "gpuexporter",
    "inferencepool",
    "lifecycle",
    "quotapolicy",
]


def _without_finalizers(registry: kopf.OperatorRegistry) -> None:
    spawning = registry._spawning  # kopf internals: no public switch for this
    spawning._handlers[:] = [
        dataclasses.replace(handler, requires_finalizer=False) for handler in spawning._handlers
    ]


_without_finalizers(kopf.get_default_registry())
