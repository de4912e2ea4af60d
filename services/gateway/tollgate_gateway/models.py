"""Model names that users choose: aliases for what vLLM serves, and fallbacks.

From the configuration document's `models` (the operator writes it from the
InferenceGateway): a client asks for `llama`; the gateway sends vLLM's
`meta-llama/Llama-3.1-8B-Instruct`, and while no replica of it is available, answers
from the named fallback instead (saying so in `x-tollgate-fallback`). Names without an
entry go upstream as they are. Key allow-lists name what clients ask for.
"""

from __future__ import annotations

from collections.abc import Mapping

from tollgate_contract.config import ModelRoute


class ModelRoutes:
    def __init__(self, routes: Mapping[str, ModelRoute] | None = None) -> None:
        self._routes = dict(routes or {})

    def __bool__(self) -> bool:
        return bool(self._routes)

    def upstream(self, model: str | None) -> str | None:
        """The name vLLM serves for what the client asked."""
        route = self._routes.get(model) if model is not None else None
        return route.upstream or model if route is not None else model

    def fallback(self, model: str | None) -> str | None:
        route = self._routes.get(model) if model is not None else None
        return route.fallback if route is not None else None

    def names(self) -> set[str]:
        """The names clients may use besides what the replicas list."""
        return set(self._routes)
