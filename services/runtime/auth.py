"""API keys: a key file (one key per line, re-read when it changes, so keys rotate without a restart),
compared in constant time, and the server interceptor that requires ``authorization: Bearer KEY`` on
every method except the health service's (probes and load balancers stay keyless)."""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health

from dsi.services.runtime.log_fields import escaped

log = logging.getLogger(__name__)

# Re-read the key file at most this often (a stat per call otherwise).
RELOAD_CHECK_S = 1.0
# What an unauthenticated caller is told: nothing about which keys exist or why a key was refused.
UNAUTHENTICATED_MESSAGE = "a valid API key is required: metadata 'authorization: Bearer KEY'"


class ApiKeyError(ValueError):
    """The key file cannot be used at start-up; the message names it."""


def parse_keys(text: str) -> tuple[str, ...]:
    """One key per line; blank lines and lines starting with '#' are skipped, spaces around a key too."""
    keys = []
    for line in text.splitlines():
        key = line.strip()
        if key and not key.startswith("#"):
            keys.append(key)
    return tuple(keys)


def bearer_token(value: str) -> str | None:
    """The key of an ``Authorization: Bearer KEY`` value (scheme case-insensitive), else None."""
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class ApiKeys:
    """The accepted keys: fixed ones and/or those of a key file, which is re-read when its modification
    time or size changes (checked at most every ``RELOAD_CHECK_S``). A file that cannot be read keeps
    the last keys it had (a secret being swapped); a file with no key accepts none."""

    def __init__(self, keys: Iterable[str] = (), path: str | Path | None = None) -> None:
        self._fixed = tuple(k for k in keys if k)
        self.path = Path(path) if path else None
        self._from_file: tuple[str, ...] = ()
        self._stamp: tuple[float, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if self.path is not None:
            try:
                self._load(os.stat(self.path))
            except OSError as exc:
                raise ApiKeyError(f"cannot read the API key file {self.path}: {exc.strerror or exc}") from None
            if not self._from_file:
                raise ApiKeyError(f"the API key file {self.path} holds no key (one key per line)")

    @classmethod
    def optional(cls, keys: Iterable[str] = (), path: str | Path | None = None) -> ApiKeys | None:
        """None when there is no key and no file: authentication off."""
        fixed = [k for k in keys if k]
        return cls(fixed, path) if fixed or path else None

    def _load(self, stat: os.stat_result) -> None:
        assert self.path is not None
        self._from_file = parse_keys(self.path.read_text(encoding="utf-8"))
        self._stamp = (stat.st_mtime, stat.st_size)

    def _refresh(self) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_S:
            return
        with self._lock:
            self._checked = now
            try:
                stat = os.stat(self.path)
                if (stat.st_mtime, stat.st_size) == self._stamp:
                    return
                before = len(self._from_file)
                self._load(stat)
            except (OSError, UnicodeDecodeError) as exc:
                log.warning("API key file %s unreadable (%s); keeping its last %d keys", self.path, exc,
                            len(self._from_file))
                return
            log.info("API key file %s reloaded: %d keys (was %d)", self.path, len(self._from_file), before)
            if not self._from_file:
                log.warning("API key file %s holds no key: every call is refused", self.path)

    @property
    def keys(self) -> tuple[str, ...]:
        self._refresh()
        return self._fixed + self._from_file

    def accepts(self, given: str | None) -> bool:
        """Whether ``given`` is one of the keys, compared in constant time against every key (no early
        exit, so the time does not tell which key came close)."""
        if not given:
            return False
        candidate = given.encode("utf-8", "surrogateescape")
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(candidate, key.encode("utf-8", "surrogateescape"))
        return ok

    def accepts_header(self, value: str | None) -> bool:
        """Whether an ``authorization`` value carries an accepted key (``Bearer KEY``)."""
        return self.accepts(bearer_token(value or ""))


def _metadata_value(metadata: Sequence[Any] | None, name: str) -> str | None:
    for item in metadata or ():
        key, value = item[0], item[1]
        if key == name:
            return value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return None


async def _refuse(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


def _ignore(data: bytes) -> None:
    """The request of a refused call is never parsed."""
    return None


def refusing_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers UNAUTHENTICATED without reading the request."""
    kind = ("stream" if handler.request_streaming else "unary") + "_" + (
        "stream" if handler.response_streaming else "unary")
    make = getattr(grpc, f"{kind}_rpc_method_handler")
    refused: grpc.RpcMethodHandler = make(_refuse, request_deserializer=_ignore,
                                          response_serializer=handler.response_serializer)
    return refused


OPEN_SERVICES = (f"/{health.SERVICE_NAME}/",)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer KEY`` (a key of ``keys``) on every method but those of
    ``open_prefixes`` (the health service): a call without an accepted key is answered
    UNAUTHENTICATED before its request is read."""

    def __init__(self, keys: ApiKeys, open_prefixes: Sequence[str] = OPEN_SERVICES) -> None:
        self.keys = keys
        self.open_prefixes = tuple(open_prefixes)
        self._refusing: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = str(handler_call_details.method)  # type: ignore[attr-defined]
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(self.open_prefixes):
            return handler
        metadata = handler_call_details.invocation_metadata  # type: ignore[attr-defined]
        if self.keys.accepts_header(_metadata_value(metadata, "authorization")):
            return handler
        log.info("refused a call to %s without a valid API key", escaped(method))
        cached = self._refusing.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, refusing_handler(handler))
            self._refusing[method] = cached
        return cached[1]
