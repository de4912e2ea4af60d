"""The endpoints off the hot path, on FastAPI: health, readiness, models, usage.

Errors raised here (and FastAPI's own 404/405/422) are rendered in the OpenAI shape by
the handlers registered in `build_api`, like the proxy's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from tollgate_gateway import errors
from tollgate_gateway.errors import GatewayError
from tollgate_gateway.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from tollgate_gateway.app import Gateway


def _error_response(
    kind: errors.ErrorKind, message: str, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        errors.error_body(kind, message),
        status_code=kind.status,
        media_type="application/json",
        headers=headers,
    )


def build_api(gateway: Gateway) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gateway.startup()
        try:
            yield
        finally:
            await gateway.shutdown()

    api = FastAPI(
        title="tollgate",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    @api.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> Response:
        return _error_response(exc.kind, exc.message, exc.headers)

    @api.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> Response:
        kind = {404: errors.NOT_FOUND, 405: errors.METHOD_NOT_ALLOWED}.get(
            exc.status_code, errors.ErrorKind(exc.status_code, "invalid_request_error", "error")
        )
        return _error_response(kind, str(exc.detail), dict(exc.headers or {}))

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Response:
        return _error_response(errors.INVALID_REQUEST, str(exc.errors()))

    @api.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the process serves requests."""
        return {"status": "ok"}

    @api.get("/ready")
    async def ready() -> Response:
        """Readiness: upstream healthy, breaker not open, not draining."""
        problems = gateway.readiness_problems()
        if problems:
            return _error_response(errors.NOT_READY, "Not ready: " + "; ".join(problems))
        return JSONResponse({"status": "ready"})

    @api.get("/metrics")
    async def metrics() -> Response:
        """Prometheus exposition; no key (scrapers are kept out by the network)."""
        return Response(gateway.metrics.render(), media_type=CONTENT_TYPE)

    @api.get("/v1/models")
    async def models(request: Request) -> Response:
        gateway.authenticate(request.headers.get("authorization"))
        served = gateway.settings.served_model_name
        # SERVED_MODEL_NAME, else the union of what the replicas list (read at health checks).
        names = [served] if served else sorted(gateway.upstreams.models())
        if not names:
            raise GatewayError(errors.UPSTREAM_ERROR, "No upstream has listed its models yet.")
        cards = [
            {"id": name, "object": "model", "created": gateway.started_at, "owned_by": "tollgate"}
            for name in names
        ]
        return JSONResponse({"object": "list", "data": cards})

    @api.get("/v1/usage")
    async def usage(request: Request) -> dict[str, object]:
        """The caller's usage today, from the shared store (flushed first, so every
        replica answers the same within the others' flush interval)."""
        key = gateway.authenticate(request.headers.get("authorization"))
        await gateway.quota.flush()
        day, counts = gateway.quota.today(key.name)
        limit = key.policy.tokens_per_day if key.policy else None
        return {
            "object": "usage",
            "key": key.name,
            "date": day,
            "tokens_used": counts.tokens,
            "prompt_tokens": counts.prompt_tokens,
            "completion_tokens": counts.completion_tokens,
            "requests": counts.requests,
            "daily_limit": limit,
            "remaining": max(0, limit - counts.tokens) if limit is not None else None,
            "resets_at": f"{day}T24:00:00Z",
        }

    return api
