"""The gateway's view of the orchestrator: the SDK's AsyncClient for Generate, the orchestrator's
health, the model it serves (from its Info) and the chat template of that model's tokenizer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from dsi.client import AsyncClient, DSIError
from dsi.services.gateway.chat import ChatTemplate, load_tokenizer
from dsi.services.gateway.errors import unavailable
from dsi.services.gateway.settings import GatewaySettings
from dsi.services.runtime.disclosure import BUILTIN_NAME, builtin_checkpoint, public_model_name

log = logging.getLogger(__name__)

T = TypeVar("T")
__all__ = ["BUILTIN_NAME", "OrchestratorBackend", "ServedModel", "served_name"]


@dataclass(frozen=True)
class ServedModel:
    name: str  # what clients pass as `model`
    max_new_tokens: int  # the orchestrator's limit per request
    max_sequence_length: int  # the context (0 = unknown)
    created: int


def served_name(checkpoint: str) -> str:
    """The public name of a checkpoint: never its full path (internal details stay internal). The
    orchestrator reports models by this name already unless it exposes internals."""
    return public_model_name(checkpoint)


def tokenizer_source(settings: GatewaySettings, checkpoint: str) -> str:
    """Where the chat template's tokenizer comes from: --tokenizer, else the checkpoint the orchestrator
    reports (a path with --expose-internals or a hub id; 'dsi-default' is the built-in pair shipped here)."""
    return settings.tokenizer or builtin_checkpoint(checkpoint) or checkpoint


def in_daemon_thread(fn: Callable[[str], T], arg: str) -> asyncio.Future[T]:
    """fn(arg) in a daemon thread: unlike the default executor, a stop does not wait for it (loading a
    tokenizer imports transformers and torch, seconds on a busy machine)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, exc = fn(arg), None
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            result, exc = None, e
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(settle, result, exc)

    threading.Thread(target=run, name=f"{getattr(fn, '__name__', 'work')}", daemon=True).start()
    return future


class OrchestratorBackend:
    """Created inside the running event loop (the gRPC channels belong to it)."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.client = AsyncClient(settings.orchestrator, timeout=settings.request_timeout_s,
                                  ca=settings.orchestrator_ca, cert=settings.orchestrator_cert,
                                  key=settings.orchestrator_key, api_key=settings.orchestrator_api_key)
        self.model: ServedModel | None = None
        self._chat: asyncio.Future[ChatTemplate] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self, on_ready: Callable[[], None]) -> None:
        self._task = asyncio.create_task(self._connect(on_ready))

    async def _connect(self, on_ready: Callable[[], None]) -> None:
        """Wait for the orchestrator's Info (it answers once it is SERVING); ready then. The tokenizer
        (only chat completions need it) loads in the background, so completions are served at once."""
        delay = 0.2
        while True:
            try:
                info = await self.client.info()
                break
            except DSIError as exc:
                if delay >= 2.0:
                    log.info("waiting for the orchestrator at %s: %s", self.settings.orchestrator, exc.code.name)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        checkpoint = str(info.get("target_model", {}).get("model", ""))
        self._chat = asyncio.create_task(self._load_chat_template(tokenizer_source(self.settings, checkpoint)))
        self.model = ServedModel(
            name=self.settings.served_model_name or served_name(checkpoint),
            max_new_tokens=int(info.get("max_new_tokens_limit", 0)),
            max_sequence_length=int(info.get("max_sequence_length", 0)),
            created=int(time.time()),
        )
        log.info("serving %r from the orchestrator at %s", self.model.name, self.settings.orchestrator)
        on_ready()

    async def _load_chat_template(self, source: str) -> ChatTemplate:
        try:
            tokenizer = await in_daemon_thread(load_tokenizer, source)
        except Exception as exc:  # noqa: BLE001 - whatever failed, chat requests say so (and the log why)
            log.warning("no chat completions: could not load a tokenizer from %r (set --tokenizer): %s", source, exc)
            return ChatTemplate(None, self.settings.chat_template, load_error=type(exc).__name__)
        return ChatTemplate(tokenizer, self.settings.chat_template)

    def require(self) -> ServedModel:
        if self.model is None:
            raise unavailable("the gateway is still connecting to the orchestrator; retry when /health is ready")
        return self.model

    async def chat_template(self) -> ChatTemplate:
        """The chat template, once the tokenizer has loaded (the first chat request may wait for it)."""
        self.require()
        assert self._chat is not None
        return await asyncio.shield(self._chat)

    async def healthy(self) -> bool:
        """Ready: the orchestrator reports SERVING and the gateway knows what it serves."""
        if self.model is None:
            return False
        return await self.client.health(timeout=2.0)

    async def close(self) -> None:
        for task in (self._task, self._chat):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.client.close()
