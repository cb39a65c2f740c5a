"""The gateway's HTTP API (Starlette): OpenAI's /v1/completions, /v1/chat/completions (both also as
server-sent events) and /v1/models, plus /health and /metrics. Each completion is one orchestrator
Generate call through the SDK's AsyncClient; a client that goes away cancels that call at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from dsi.client import Delta, DSIError
from dsi.services.gateway import protocol
from dsi.services.gateway.backend import OrchestratorBackend, ServedModel
from dsi.services.gateway.errors import (
    APIError,
    bad_request,
    from_dsi_error,
    from_validation_error,
    model_not_found,
    overloaded,
)
from dsi.services.gateway.metrics import GatewayMetrics
from dsi.services.gateway.settings import GatewaySettings
from dsi.services.runtime.auth import ApiKeys

log = logging.getLogger(__name__)
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class ClientGone(Exception):
    """The HTTP client disconnected before its response was ready."""


async def _wait_disconnect(receive: Receive) -> None:
    # The body was read already, so the next message is http.disconnect, whenever the client leaves.
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run ``work`` unless the client disconnects first; then cancel it (which cancels the gRPC
    call inside it) and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()  # no-op when it finished
        watcher.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        raise ClientGone()
    return task.result()


class EventStream(StreamingResponse):
    """Server-sent events whose producer is cancelled as soon as the client disconnects, whatever
    ASGI spec version the server reports (Starlette only listens for it below 2.4); ``on_close``
    runs in every case, told whether the client left early."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[bool], Awaitable[None]],
                 headers: dict[str, str]) -> None:
        super().__init__(content, headers={"cache-control": "no-cache", **headers})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        producer = asyncio.ensure_future(self.stream_response(send))
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait((producer, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone = not producer.done()
            producer.cancel()
            watcher.cancel()
            try:
                done = await asyncio.gather(producer, watcher, return_exceptions=True)
                if isinstance(done[0], Exception) and not isinstance(done[0], OSError):
                    log.error("stream failed", exc_info=done[0])
                gone = gone or isinstance(done[0], OSError)  # a send to a closed connection
            finally:
                await self._on_close(gone)


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class Admission:
    """Completions running at once, bounded: over the limit a request is refused (429), never queued."""

    def __init__(self, limit: int, metrics: GatewayMetrics) -> None:
        self.limit = limit
        self.running = 0
        self.metrics = metrics

    def enter(self) -> None:
        if self.running >= self.limit:
            raise overloaded(self.limit)
        self.running += 1
        self.metrics.running.set(self.running)

    def leave(self) -> None:
        self.running -= 1
        self.metrics.running.set(self.running)


class Gateway:
    """The request handlers, with the state they share."""

    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.admission = Admission(settings.max_concurrent_requests, metrics)
        # --api-key and --api-key-file (re-read when it changes); None = /v1/* needs no key.
        self.keys = ApiKeys.optional([settings.api_key], settings.api_key_file or None)
        self._backend: OrchestratorBackend | None = None

    @property
    def backend(self) -> OrchestratorBackend:
        assert self._backend is not None, "the app's lifespan has not started"
        return self._backend

    # -- request plumbing ------------------------------------------------------------------------

    def authorize(self, request: Request) -> None:
        if self.keys is None:
            return
        if not self.keys.accepts_header(request.headers.get("authorization")):
            raise APIError(401, "a valid API key is required: 'Authorization: Bearer KEY'", "authentication_error",
                           code="invalid_api_key")

    async def read_json(self, request: Request) -> dict[str, Any]:
        """The body as a JSON object, refused (413) past --max-request-bytes before it is parsed."""
        limit = self.settings.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the request body exceeds {limit} bytes (--max-request-bytes)")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise APIError(413, f"the request body exceeds {limit} bytes (--max-request-bytes)")
        try:
            obj = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise bad_request(None, f"the body is not valid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise bad_request(None, "the body must be a JSON object")
        return obj

    @staticmethod
    def parse(model: type[M], body: dict[str, Any]) -> M:
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            raise from_validation_error(exc) from None

    def answer(self, endpoint: str, response: Response) -> Response:
        self.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    # -- endpoints -------------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, chat=True)

    async def _complete(self, request: Request, chat: bool) -> Response:
        endpoint = "chat.completions" if chat else "completions"
        started = time.monotonic()
        try:
            self.authorize(request)
            body = await self.read_json(request)
            served = self.backend.require()
            req: protocol.ChatCompletionRequest | protocol.CompletionRequest
            if chat:
                req = self.parse(protocol.ChatCompletionRequest, body)
            else:
                req = self.parse(protocol.CompletionRequest, body)
            if req.model != served.name:
                raise model_not_found(req.model)
            protocol.check_extras(req)
            request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            gen = await self._generation(req, served, request_id)
            shape = protocol.ResponseShape(request_id, served.name, chat)
            self.admission.enter()
        except APIError as exc:
            return self.answer(endpoint, exc.response())
        headers = {"x-request-id": shape.id}
        if gen.stream:
            return await self._stream(request, endpoint, gen, shape, headers, started)
        try:
            result = await until_disconnected(request, self._collect(gen))
        except ClientGone:
            self.metrics.disconnects.labels(endpoint).inc()
            return self.answer(endpoint, Response(status_code=499))
        except DSIError as exc:
            return self.answer(endpoint, from_dsi_error(exc, gen.params, shape.id).response())
        finally:
            self.admission.leave()
            self.metrics.seconds.labels(endpoint, "false").observe(time.monotonic() - started)
        return self.answer(endpoint, JSONResponse(shape.full(result), headers=headers))

    async def _generation(self, req: protocol.ChatCompletionRequest | protocol.CompletionRequest,
                          served: ServedModel, request_id: str) -> protocol.Generation:
        """The orchestrator call: the prompt (chat: rendered with the chat template) and its length."""
        if isinstance(req, protocol.CompletionRequest):
            max_tokens = protocol.COMPLETIONS_DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
            return protocol.generation(req, protocol.completion_prompt(req.prompt), max_tokens, "max_tokens",
                                       truncate_at_context=False, request_id=request_id)
        messages = protocol.conversation(req)
        template = await self.backend.chat_template()
        prompt = await asyncio.to_thread(template.render, messages)
        if req.max_completion_tokens is not None:
            return protocol.generation(req, prompt, req.max_completion_tokens, "max_completion_tokens",
                                       truncate_at_context=False, request_id=request_id)
        if req.max_tokens is not None:
            return protocol.generation(req, prompt, req.max_tokens, "max_tokens", truncate_at_context=False,
                                       request_id=request_id)
        # No limit given: as many tokens as the orchestrator allows and the context holds.
        return protocol.generation(req, prompt, max(1, served.max_new_tokens), "max_tokens",
                                   truncate_at_context=True, request_id=request_id)

    async def _collect(self, gen: protocol.Generation) -> protocol.Result:
        result = protocol.Result()
        stream = cast(AsyncGenerator[Delta, None], self.backend.client.stream(gen.prompt, **gen.kwargs))
        async with contextlib.aclosing(stream) as deltas:
            async for d in deltas:
                result.add(d)
        return result

    async def _stream(self, request: Request, endpoint: str, gen: protocol.Generation,
                      shape: protocol.ResponseShape, headers: dict[str, str], started: float) -> Response:
        deltas = cast(AsyncGenerator[Delta, None], self.backend.client.stream(gen.prompt, **gen.kwargs))

        async def close(gone: bool) -> None:
            await deltas.aclose()  # cancels the gRPC call if it is still running
            self.admission.leave()
            self.metrics.seconds.labels(endpoint, "true").observe(time.monotonic() - started)
            if gone:
                self.metrics.disconnects.labels(endpoint).inc()
                log.info("request %s: the client went away; generation cancelled", shape.id)

        try:
            # The first tokens (or the orchestrator's refusal) before the status line, so that bad
            # input still gets its 4xx rather than an error event in a 200 stream.
            first = await until_disconnected(request, anext(deltas))
        except ClientGone:
            await close(True)
            return self.answer(endpoint, Response(status_code=499))
        except DSIError as exc:
            await close(False)
            return self.answer(endpoint, from_dsi_error(exc, gen.params, shape.id).response())
        except BaseException:
            await close(False)
            raise
        return self.answer(endpoint, EventStream(self._events(first, deltas, gen, shape), close, headers))

    async def _events(self, first: Delta, deltas: AsyncIterator[Delta], gen: protocol.Generation,
                      shape: protocol.ResponseShape) -> AsyncIterator[bytes]:
        result = protocol.Result()
        if shape.chat:
            yield sse(shape.chunk("", role=True))
        try:
            delta: Delta | None = first
            while delta is not None:
                result.add(delta)
                if delta.text:
                    yield sse(shape.chunk(delta.text))
                delta = None if delta.stats is not None else await anext(deltas, None)
        except DSIError as exc:
            yield sse(protocol.error_event(from_dsi_error(exc, gen.params, shape.id)))
            yield b"data: [DONE]\n\n"
            return
        yield sse(shape.chunk(None if shape.chat else "", result.finish_reason, result.stats))
        if gen.include_usage:
            yield sse(shape.usage_chunk(result.stats))
        yield b"data: [DONE]\n\n"

    async def models(self, request: Request) -> Response:
        try:
            self.authorize(request)
            served = self.backend.require()
        except APIError as exc:
            return self.answer("models", exc.response())
        card = {"id": served.name, "object": "model", "created": served.created, "owned_by": "dsi"}
        wanted = request.path_params.get("model")
        if wanted is None:
            return self.answer("models", JSONResponse({"object": "list", "data": [card]}))
        if wanted != served.name:
            return self.answer("models", model_not_found(wanted).response())
        return self.answer("models", JSONResponse(card))

    async def health(self, request: Request) -> Response:
        if await self.backend.healthy():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "reason": "the orchestrator is not SERVING"}, status_code=503)

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def internal_error(self, request: Request, exc: Exception) -> Response:
        # An OpenAI-shaped body; the server logs the exception (with its traceback) once.
        return APIError(500, "internal error in the gateway", "server_error").response()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette, on_ready: Callable[[], None]) -> AsyncIterator[None]:
        self._backend = OrchestratorBackend(self.settings)
        self._backend.start(on_ready)
        try:
            yield
        finally:
            await self._backend.close()


def build_app(settings: GatewaySettings, on_ready: Callable[[], None] = lambda: None,
              metrics: GatewayMetrics | None = None) -> Starlette:
    """The ASGI app; ``on_ready`` runs once the orchestrator's model and tokenizer are known."""
    gw = Gateway(settings, metrics or GatewayMetrics())
    routes = [
        Route("/v1/completions", gw.completions, methods=["POST"]),
        Route("/v1/chat/completions", gw.chat_completions, methods=["POST"]),
        Route("/v1/models", gw.models, methods=["GET"]),
        Route("/v1/models/{model:path}", gw.models, methods=["GET"]),
        Route("/health", gw.health, methods=["GET"]),
        Route("/metrics", gw.prometheus, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lambda app: gw.lifespan(app, on_ready),
                     exception_handlers={Exception: gw.internal_error})
