"""The operator's in-memory state, shared by the handlers through kopf's memo.

It holds what is not in any single object: the API client, the hashes read from key
Secrets (by ApiKey uid), today's usage per gateway, and one ConfigWriter per gateway. All
of it can be rebuilt from the cluster, which is what happens after a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .client import SECRETS, KubeClient
from .configdoc import ApiKeyView
from .keys import Material, MaterialError, material_from_secret
from .usage import Usage, UsageReader

log = logging.getLogger(__name__)

KeyStatusHook = Callable[[str, Iterable[str]], Awaitable[None]]


@dataclass
class Runtime:
    client: KubeClient
    usage_reader: UsageReader = field(default_factory=UsageReader)
    # ApiKey uid -> the hashes of its key (or why there are none).
    materials: dict[str, Material | MaterialError] = field(default_factory=dict)
    # (namespace, gateway) -> {key name -> today's usage}
    usage: dict[tuple[str, str], dict[str, Usage]] = field(default_factory=dict)
    writers: dict[tuple[str, str], Any] = field(default_factory=dict)  # ConfigWriter
    locks: defaultdict[tuple[str, str, str], asyncio.Lock] = field(
        default_factory=lambda: defaultdict(asyncio.Lock)
    )
    key_status_hook: KeyStatusHook | None = None
    # kopf's live index of InferenceGateways (set by the first handler that receives it).
    gateway_index: Any = None

    def gateway_alive(self, namespace: str, name: str) -> bool:
        views = self.gateway_index.get((namespace, name), []) if self.gateway_index else []
        return any(not v.deleting for v in views)

    def poke_namespace(self, namespace: str) -> None:
        """Something a gateway config may depend on changed in this namespace."""
        for (ns, _), writer in list(self.writers.items()):
            if ns == namespace:
                writer.poke()

    async def load_material(self, key: ApiKeyView) -> Material | MaterialError | None:
        """The key's hashes from its Secret (reads only; the ApiKey handler creates
        generated Secrets). Cached by uid; None when the Secret is not there."""
        secret = await self.client.get(SECRETS, key.namespace, key.secret_name)
        return self.remember(key, secret)

    def remember(
        self, key: ApiKeyView, secret: dict[str, Any] | None
    ) -> Material | MaterialError | None:
        if secret is None:
            self.materials.pop(key.uid, None)
            return None
        result: Material | MaterialError
        if key.generated and not _owned(secret, key.uid):
            result = MaterialError(
                "SecretConflict", f"Secret {key.secret_name} exists and is not this key's"
            )
        else:
            try:
                result = material_from_secret(secret, key.key_field, key.previous_field)
            except MaterialError as exc:
                result = exc
        self.materials[key.uid] = result
        return result

    async def close(self) -> None:
        await self.usage_reader.close()
        await self.client.close()


def _owned(obj: dict[str, Any], uid: str) -> bool:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid for ref in refs)
