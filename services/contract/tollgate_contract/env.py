"""The environment of the gateway container, as the operator writes it.

Each name is a field of the gateway's `Settings` (a test checks it, and that the operator
sets no other), so a rename on either side fails the tests instead of a deployment.
"""

from __future__ import annotations

from typing import Final

VLLM_URL: Final = "VLLM_URL"
VLLM_URLS: Final = "VLLM_URLS"
VLLM_DNS_NAME: Final = "VLLM_DNS_NAME"
VLLM_API_KEY: Final = "VLLM_API_KEY"
SERVED_MODEL_NAME: Final = "SERVED_MODEL_NAME"
GATEWAY_SESSION_AFFINITY: Final = "GATEWAY_SESSION_AFFINITY"
GATEWAY_PORT: Final = "GATEWAY_PORT"
GATEWAY_METRICS_PORT: Final = "GATEWAY_METRICS_PORT"
GATEWAY_CONFIG_FILE: Final = "GATEWAY_CONFIG_FILE"
GATEWAY_CONFIG_SECRET: Final = "GATEWAY_CONFIG_SECRET"
GATEWAY_DRAIN_SECONDS: Final = "GATEWAY_DRAIN_SECONDS"
GATEWAY_SHUTDOWN_DELAY_SECONDS: Final = "GATEWAY_SHUTDOWN_DELAY_SECONDS"
DATABASE_URL: Final = "DATABASE_URL"
QUOTA_DB_SCHEMA: Final = "QUOTA_DB_SCHEMA"

# Every name above: what the operator may set.
ALL: Final = frozenset(
    value for name, value in dict(globals()).items() if name.isupper() and isinstance(value, str)
)
