"""The endpoints off the hot path, on FastAPI: models and usage (and FastAPI's 404s).

This module is imported on the first request that needs it, in a thread, so FastAPI
costs neither start-up time nor memory until then (`app.Gateway.side_api`); the probes
are raw (`probes.py`). Every error here (a `Refusal`, and FastAPI's own 404/405/422) is
rendered by the one renderer the proxy uses (`errors.response_parts`), so all routes
answer alike; every response carries `x-request-id`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from tollgate_gateway import errors
from tollgate_gateway.asgi import request_id_for
from tollgate_gateway.config_watch import CurrentConfig
from tollgate_gateway.errors import Refusal, response_parts
from tollgate_gateway.keys import ApiKey
from tollgate_gateway.lifecycle import Lifecycle
from tollgate_gateway.quota import QuotaLedger
from tollgate_gateway.upstream import UpstreamPool


def refusal_response(refusal: Refusal, request_id: str = "") -> Response:
    status, headers, body = response_parts(refusal, request_id)
    response = Response(body, status_code=status)
    response.raw_headers = headers
    return response


def build_api(
    current: CurrentConfig,
    pool: UpstreamPool,
    quota: QuotaLedger,
    lifecycle: Lifecycle,
    served_model_name: str | None,
) -> FastAPI:
    api = FastAPI(title="tollgate", docs_url=None, redoc_url=None, openapi_url=None)

    @api.middleware("http")
    async def request_id(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        rid = request_id_for(request.headers.get("x-request-id", "").encode("latin-1"))
        response = await call_next(request)
        response.headers["x-request-id"] = rid
        return response

    @api.exception_handler(Refusal)
    async def _refusal(request: Request, exc: Refusal) -> Response:
        return refusal_response(exc)

    @api.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        kind = {404: errors.NOT_FOUND, 405: errors.METHOD_NOT_ALLOWED}.get(
            exc.status_code, errors.ErrorKind(exc.status_code, "invalid_request_error", "error")
        )
        headers = [(k.lower().encode(), v.encode()) for k, v in (exc.headers or {}).items()]
        return refusal_response(Refusal(kind, str(exc.detail), headers=headers))

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return refusal_response(Refusal(errors.INVALID_REQUEST, str(exc.errors())))

    def authenticate(request: Request) -> ApiKey:
        return current.ring.authenticate(request.headers.raw)

    def model_names(key: ApiKey) -> list[str]:
        # SERVED_MODEL_NAME, else the union of what the replicas list (read at health checks),
        # and the names the configuration gives models, less what this key may not use.
        served = {served_model_name} if served_model_name else pool.models()
        return sorted(name for name in served | current.models.names() if key.may_use(name))

    def card(name: str) -> dict[str, object]:
        created = lifecycle.started_at
        return {"id": name, "object": "model", "created": created, "owned_by": "tollgate"}

    @api.get("/v1/models")
    async def models(request: Request) -> Response:
        key = authenticate(request)
        names = model_names(key)
        if not names and not served_model_name and not pool.models():
            raise Refusal(errors.UPSTREAM_ERROR, "No upstream has listed its models yet.")
        return JSONResponse({"object": "list", "data": [card(name) for name in names]})

    @api.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> Response:
        key = authenticate(request)
        if model_id not in model_names(key):
            raise Refusal(
                errors.MODEL_NOT_FOUND, f"The model `{model_id}` does not exist.", param="model"
            )
        return JSONResponse(card(model_id))

    @api.get("/v1/usage")
    async def usage(request: Request) -> dict[str, object]:
        """The caller's usage today, from the shared store (flushed first, so every
        replica answers the same within the others' flush interval)."""
        key = authenticate(request)
        await quota.flush()
        day, counts = quota.today(key.name)
        limit = key.policy.tokens_per_day if key.policy else None
        resets = dt.date.fromisoformat(day) + dt.timedelta(days=1)
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
            "resets_at": f"{resets.isoformat()}T00:00:00Z",
        }

    return api
