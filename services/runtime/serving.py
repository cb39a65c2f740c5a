"""Running a grpc.aio server: TLS (mutual where configured), health (NOT_SERVING until warmed up),
reflection (optional), limits, metrics endpoint, and graceful shutdown on SIGTERM/SIGINT (health
NOT_SERVING -> server.stop(grace))."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dsi.services.runtime.errors import InvalidArgument
from dsi.services.runtime.tls import ServerTLS

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 0
    max_concurrent_rpcs: int = 256
    grace_s: float = 5.0
    metrics_port: int = 0
    tls: ServerTLS | None = None  # None = plaintext
    reflection: bool = True  # grpc.reflection.v1alpha: the services' schemas for grpcurl and the like
    max_request_bytes: int = MAX_MESSAGE_BYTES  # largest request message accepted (RESOURCE_EXHAUSTED beyond)


def install_uvloop() -> None:
    """Use uvloop for the event loop when it is installed (before any loop or channel exists)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but keep asyncio working
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run_async(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """asyncio.run with uvloop."""
    install_uvloop()
    asyncio.run(main())


class GrpcServer:
    """A grpc.aio server with health (and reflection, unless ``options.reflection`` is off) for the
    given service names, on a TLS port when ``options.tls`` is set."""

    def __init__(
        self,
        options: ServerOptions,
        service_names: Iterable[str],
        role: str,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        self.options = options
        self.role = role
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", options.max_request_bytes),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=options.max_concurrent_rpcs,
            # Outermost, so that it guards whatever handler the other interceptors hand back.
            interceptors=[MalformedRequestGuard(), *interceptors],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if options.reflection:
            names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
            reflection.enable_server_reflection(names, self.server)
        self._service_names = list(service_names)
        self.port = 0
        self._stop = asyncio.Event()

    async def start(self) -> int:
        address = f"{self.options.host}:{self.options.port}"
        tls = self.options.tls
        self.port = (self.server.add_secure_port(address, tls.credentials()) if tls is not None
                     else self.server.add_insecure_port(address))
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.options.host}:{self.options.port}")
        await self._set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._stop.set)
            except (NotImplementedError, RuntimeError):  # pragma: no cover - non-main thread
                pass
        return self.port

    async def _set_status(self, status: int) -> None:
        for name in ["", *self._service_names]:
            await self.health.set(name, status)

    async def set_status(self, serving: bool) -> None:
        """Report SERVING or NOT_SERVING on the health service (e.g. while no dependency answers)."""
        await self._set_status(
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    async def set_serving(self) -> None:
        await self._set_status(health_pb2.HealthCheckResponse.SERVING)
        # One line on stdout that launchers (dsi up, tests) wait for; logs go to stderr.
        print(f"dsi-{self.role} listening on {self.options.host}:{self.port}", flush=True)
        tls = self.options.tls
        log.info("%s serving on %s:%d (%s)", self.role, self.options.host, self.port,
                 "plaintext" if tls is None else "mutual TLS" if tls.mutual else "TLS")

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_and_stop(self) -> None:
        await self._stop.wait()
        log.info("%s shutting down (grace %.1fs)", self.role, self.options.grace_s)
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.options.grace_s)


@dataclass(frozen=True)
class UndecodableRequest:
    """What a guarded request deserializer returns for bytes that are not a valid message of the
    method's request type: the guarded handler answers it with INVALID_ARGUMENT."""

    method: str
    error: str

    @property
    def problem(self) -> str:
        return f"not a valid {self.method} request message ({self.error})"

    @property
    def details(self) -> str:
        return f"request: {self.problem}"


class UndecodableRequestError(InvalidArgument):
    """Raised where a servicer reads an undecodable message from a client stream."""

    def __init__(self, request: UndecodableRequest) -> None:
        super().__init__("request", request.problem)
        self.request = request


def decode_or_mark(deserializer: Callable[[bytes], Any], method: str) -> Callable[[bytes], Any]:
    """``deserializer`` that returns an ``UndecodableRequest`` instead of raising: grpc.aio would log
    the exception with a traceback and answer UNKNOWN (INTERNAL on a bidi stream)."""

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's bad input
            return UndecodableRequest(method, f"{type(exc).__name__}: {str(exc)[:200]}")

    return deserialize


async def _abort_undecodable(context: grpc.aio.ServicerContext, request: UndecodableRequest) -> None:
    log.debug("undecodable request to %r: %s", request.method, request.error)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)


async def _checked_requests(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for message in requests:
        if isinstance(message, UndecodableRequest):
            # Raised, not aborted here: the reader may be another task than the handler's (DraftFlow),
            # and a status sent while the handler writes a response fails in grpc core
            # (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS) and the call hangs. The servicer's grpc_errors maps
            # this InvalidArgument on the handler's task, or the guard's wrapper does.
            log.debug("undecodable request to %r: %s", message.method, message.error)
            raise UndecodableRequestError(message)
        yield message


def guard_handler(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """The same handler, answering INVALID_ARGUMENT for any request message that does not decode.

    Asyncio behaviours (coroutine or async generator functions: every servicer here, health and
    reflection) are wrapped, and synchronous unary ones (a generated servicer's UNIMPLEMENTED stubs,
    such as Health/List), which then run in the loop's executor as grpc.aio would run them, their
    NotImplementedError answered UNIMPLEMENTED without a traceback; a synchronous streaming one is
    returned unchanged. Servicers read client streams through their request iterator, not
    ``context.read()``.
    """
    kind = (
        ("stream" if handler.request_streaming else "unary")
        + "_"
        + ("stream" if handler.response_streaming else "unary")
    )
    behaviour = getattr(handler, kind)
    if behaviour is None or handler.request_deserializer is None:
        return handler
    is_gen = inspect.isasyncgenfunction(behaviour)
    if not (is_gen or inspect.iscoroutinefunction(behaviour)):
        if kind != "unary_unary":
            return handler
        sync_behaviour = behaviour

        async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await asyncio.get_running_loop().run_in_executor(None, sync_behaviour, request, context)
            except NotImplementedError:  # a generated stub (e.g. Health/List): UNIMPLEMENTED, no traceback
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, "method not implemented")

    wrapped: Callable[..., Any]

    if handler.request_streaming:
        if is_gen:

            async def wrapped(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    async with contextlib.aclosing(behaviour(_checked_requests(requests), context)) as out:
                        async for response in out:
                            yield response
                except UndecodableRequestError as exc:  # a servicer without grpc_errors (reflection)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)

        else:

            async def wrapped(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await behaviour(_checked_requests(requests), context)
                except UndecodableRequestError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)

    elif is_gen:

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, UndecodableRequest):
                await _abort_undecodable(context, request)
            async with contextlib.aclosing(behaviour(request, context)) as out:
                async for response in out:
                    yield response

    else:

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, UndecodableRequest):
                await _abort_undecodable(context, request)
            return await behaviour(request, context)

    make = getattr(grpc, f"{kind}_rpc_method_handler")
    guarded: grpc.RpcMethodHandler = make(
        wrapped,
        request_deserializer=decode_or_mark(handler.request_deserializer, method),
        response_serializer=handler.response_serializer,
    )
    return guarded


class MalformedRequestGuard(grpc.aio.ServerInterceptor):
    """Server interceptor that makes an undecodable request message INVALID_ARGUMENT on every method
    (generated handlers, health, reflection), with one debug line instead of a traceback per call."""

    def __init__(self) -> None:
        # method -> (handler as registered, guarded handler); bounded by the methods registered.
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = str(handler_call_details.method)  # type: ignore[attr-defined]
        cached = self._guarded.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        guarded = guard_handler(handler, method)
        self._guarded[method] = (handler, guarded)
        return guarded


def start_metrics_server(port: int, registry: object, host: str = "127.0.0.1") -> None:
    """Expose Prometheus metrics on http://host:port/metrics when port > 0 (the service's own --host:
    loopback unless it was told otherwise)."""
    if port <= 0:
        return
    from prometheus_client import start_http_server

    start_http_server(port, addr=host, registry=registry)  # type: ignore[arg-type]
    log.info("metrics on %s:%d/metrics", host, port)


def run_service(
    log_level: str, serve: Callable[[], Coroutine[Any, Any, None]], refusals: tuple[type[Exception], ...]
) -> int:
    """Run a service's ``serve()`` to the end (exit status 0). A refusal to start (one of
    ``refusals``: the cluster or model is not usable as configured) is one clear error line and exit
    status 1, not a traceback."""
    configure_logging(log_level)
    try:
        run_async(serve)
    except refusals as exc:
        log.error("refusing to start: %s", exc)
        return 1
    return 0


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
