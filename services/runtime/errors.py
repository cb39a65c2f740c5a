"""The one place where domain errors become gRPC status codes.

Servicers raise (or let through) these exceptions; ``grpc_errors`` turns them into ``context.abort``
with the right code, so bad input is never reported as UNKNOWN or INTERNAL. A public servicer can
rewrite what its callers are told (``client_message``): the full message goes to the log, the caller
gets one that names no internal endpoint.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from dsi.services.runtime.log_fields import escaped
from dsi.services.runtime.model_errors import DeviceOutOfMemory, ModelError, PrefixNotHeld

log = logging.getLogger(__name__)


# Trailing metadata key of a RESOURCE_EXHAUSTED refusal: milliseconds after which a retry may succeed.
RETRY_AFTER_MS = "retry-after-ms"


class ServiceError(Exception):
    """An error with a gRPC status code and a message meant for the caller."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    """Bad input; the message starts with the offending field's name."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    if isinstance(exc, DecodeError):
        # Request messages are decoded by serving.MalformedRequestGuard; this catches any a servicer
        # parses itself (e.g. from context.read()).
        return grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid message ({exc})"
    if isinstance(exc, DeviceOutOfMemory):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, PrefixNotHeld):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, ModelError):
        return grpc.StatusCode.INTERNAL, str(exc)
    if isinstance(exc, grpc.aio.AioRpcError):
        # A downstream call failed: pass its status through with context.
        return exc.code(), f"downstream call failed: {exc.details()}"
    return None


def _request_id(request: Any) -> str:
    # Escaped: a servicer may fail before it validates the request (a caller's id with a newline
    # would otherwise forge a log line).
    return escaped(getattr(request, "request_id", "") or "-")


class ClientMessages:
    """What a servicer tells its callers about a failure, given the exception, its status code and the
    full message (which has been logged). The default tells them the full message."""

    def client_message(self, exc: Exception, code: grpc.StatusCode, message: str) -> str:
        return message


def grpc_errors(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for servicer methods (unary or server-streaming) that maps exceptions to statuses."""
    name = handler.__qualname__

    async def _abort(servicer: Any, context: grpc.aio.ServicerContext, request: Any, exc: Exception) -> None:
        mapped = _status_for(exc)
        if mapped is None:
            log.exception("request %s: unexpected error in %s", _request_id(request), name)
            mapped = (grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        elif mapped[0] not in (grpc.StatusCode.INVALID_ARGUMENT,):
            log.warning("request %s: %s failed: %s", _request_id(request), name, escaped(mapped[1], 4000))
        code, message = mapped
        if isinstance(servicer, ClientMessages):
            message = servicer.client_message(exc, code, message)
        retry_after_s = getattr(exc, "retry_after_s", None)
        if retry_after_s is not None:  # overload: when to try again, machine-readable
            context.set_trailing_metadata(((RETRY_AFTER_MS, str(int(retry_after_s * 1000))),))
        await context.abort(code, message)

    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in handler(self, request, context):
                    yield item
            except Exception as exc:  # noqa: BLE001 - mapped to a status below
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                await _abort(self, context, request, exc)

        return stream

    @functools.wraps(handler)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped to a status below
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await _abort(self, context, request, exc)

    return unary
