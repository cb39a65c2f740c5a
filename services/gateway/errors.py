"""The one place where failures become HTTP statuses and OpenAI's error body
``{"error": {"message", "type", "param", "code"}}``: the orchestrator's gRPC codes, request-shape
errors and the gateway's own refusals."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import grpc
from pydantic import ValidationError
from starlette.responses import JSONResponse

from dsi.client import DSIError

log = logging.getLogger(__name__)

# gRPC status -> (HTTP status, OpenAI error type). Codes not listed are server errors (500).
_HTTP: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    # The orchestrator refusing the gateway's own key (--orchestrator-api-key-file) is the gateway's
    # misconfiguration, not the client's: a server error, logged.
    grpc.StatusCode.UNAUTHENTICATED: (500, "server_error"),
    grpc.StatusCode.PERMISSION_DENIED: (500, "server_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "server_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
# What a client is told for server-side failures; the orchestrator's message (which may name internal
# endpoints) goes to the log only.
_PUBLIC_MESSAGE = {
    503: "the model service is unavailable; retry later",
    504: "the request did not finish within the gateway's deadline (--request-timeout-s)",
    500: "internal error in the model service",
    501: "not implemented by the model service",
}


class APIError(Exception):
    """A failed request as the client sees it."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad_request(param: str | None, problem: str) -> APIError:
    """HTTP 400 naming the parameter (its name starts the message, as in the orchestrator's errors)."""
    return APIError(400, f"{param}: {problem}" if param else problem, param=param)


def unsupported(param: str) -> APIError:
    return bad_request(param, "not supported by this server")


def unrecognized(param: str) -> APIError:
    return APIError(400, f"Unrecognized request argument supplied: {param}", param=param)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def unavailable(message: str) -> APIError:
    return APIError(503, message, "service_unavailable_error")


def overloaded(limit: int) -> APIError:
    return APIError(429, f"the gateway is running {limit} requests already (--max-concurrent-requests); retry later",
                    "rate_limit_error", code="rate_limit_exceeded")


def from_dsi_error(exc: DSIError, params: Mapping[str, str], request_id: str) -> APIError:
    """An orchestrator error as the client sees it. Bad-input messages start with the orchestrator's
    field name ('max_new_tokens: must be ...'); ``params`` renames it to the OpenAI parameter the
    client sent ('max_tokens')."""
    status, type_ = _HTTP.get(exc.code, (500, "server_error"))
    if status >= 500:
        log.warning("request %s: orchestrator %s: %s", request_id, exc.code.name, exc.details)
        return APIError(status, _PUBLIC_MESSAGE.get(status, _PUBLIC_MESSAGE[500]), type_, code=exc.code.name.lower())
    field, sep, problem = exc.details.partition(": ")
    base = field.split("[", 1)[0]
    if sep and base.replace("_", "").replace(".", "").isalnum():
        param = params.get(base, field)
        return APIError(status, f"{param}: {problem}", type_, param=param, code=exc.code.name.lower())
    return APIError(status, exc.details, type_, code=exc.code.name.lower())


def param_path(loc: tuple[int | str, ...]) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def from_validation_error(exc: ValidationError) -> APIError:
    """The first problem pydantic found, naming the parameter."""
    first = exc.errors(include_url=False)[0]
    param = param_path(tuple(first["loc"])) or None
    if first["type"] == "extra_forbidden":
        return unrecognized(param or "?")
    if first["type"] == "missing":
        return bad_request(param, "is required")
    return bad_request(param, str(first["msg"]))
