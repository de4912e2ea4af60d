"""Errors in vLLM's shapes: the OpenAI one (`ErrorResponse`, every OpenAI route), the
Anthropic one (`/v1/messages`), and FastAPI's `{"detail": …}` for unknown routes."""

from __future__ import annotations

from http import HTTPStatus

from tollgate_sim.http import dumps

_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}


class ApiError(Exception):
    """What a handler raises to answer an error; `flavor` picks the body's shape."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        err_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.err_type = err_type or error_type(status)

    def body(self, flavor: str = "openai") -> bytes:
        if flavor == "anthropic":
            return anthropic_error(str(self), self.err_type)
        return openai_error(str(self), self.status, self.param, self.err_type)


def error_type(status: int) -> str:
    return _TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "")


def openai_error(
    message: str, status: int, param: str | None = None, err_type: str | None = None
) -> bytes:
    """vLLM's ErrorResponse: {"error": {"message", "type", "param", "code"}}."""
    info = {"message": message, "type": err_type or error_type(status), "param": param}
    return dumps({"error": {**info, "code": status}})


def anthropic_error(message: str, err_type: str) -> bytes:
    """vLLM's AnthropicErrorResponse: the ErrorResponse's type and message, re-wrapped."""
    return dumps({"type": "error", "error": {"type": err_type, "message": message}})


def not_found_model(model: str) -> ApiError:
    """vLLM's OpenAIServing._check_model answer for a model it does not serve."""
    return ApiError(f"The model `{model}` does not exist.", 404, "model", "NotFoundError")


NOT_FOUND = b'{"detail":"Not Found"}'
METHOD_NOT_ALLOWED = b'{"detail":"Method Not Allowed"}'
