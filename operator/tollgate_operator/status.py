"""One way to write status, for all four kinds: read, compute, patch only the difference.

Each kind's handler supplies what its status should say given the object as it is now;
this module does the rest under the object's lock (so two writers of one status never
interleave), and writes nothing when nothing changed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .client import Kind
from .conditions import status_patch
from .runtime import Runtime

Body = dict[str, Any]
# The whole wanted status for an object as it is now, or None to leave it alone.
Compute = Callable[[Body], dict[str, Any] | None]


async def write_status(
    runtime: Runtime,
    kind: Kind,
    namespace: str,
    name: str,
    compute: Compute,
    *,
    body: Body | None = None,
    while_deleting: bool = False,
) -> Body | None:
    """Patch the status of one object to what `compute` says. Returns the object as read
    (before the patch), or None when it is gone, being deleted (unless `while_deleting`),
    or `compute` declined. With `body` (as a watch delivered it: a periodic refresh)
    nothing is read; a merge patch of a few fields is safe on a slightly older copy."""
    client = runtime.client
    async with runtime.lock(kind, namespace, name):
        if body is None:
            body = await client.get(kind, namespace, name)
        if body is None or (body["metadata"].get("deletionTimestamp") and not while_deleting):
            return None
        wanted = compute(body)
        if wanted is None:
            return None
        patch = status_patch(body.get("status"), wanted)
        if patch:
            await client.patch(kind, namespace, name, {"status": patch}, status=True)
        return body
