"""Client SDK for the DSI orchestrator, synchronous (``Client``) and asyncio (``AsyncClient``).

    from dsi.client import Client
    with Client("localhost:50051") as client:
        result = client.generate("def fibonacci(n):", max_new_tokens=64, mode="dsi")
        print(result.text, result.stats["acceptance_rate"])
        for delta in client.stream("import os", max_new_tokens=32):
            print(delta.text, end="", flush=True)

Errors raise ``DSIError`` carrying the gRPC status code and the server's message.

A secured orchestrator (see docs/security.md): ``ca`` (the CA that signed its certificate; TLS), ``cert``
and ``key`` (this client's certificate, when the server requires one), each a file path or PEM bytes,
and ``api_key`` (sent as ``authorization: Bearer KEY`` with every call)::

    Client("dsi.example.com:50051", ca="certs/ca.crt", cert="certs/client.crt", key="certs/client.key",
           api_key=os.environ["DSI_API_KEY"])
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dsi.tls import PemSource, bearer_metadata, client_tls, sync_channel
from dsi.tls import aio_channel as _aio_channel
from dsi.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc

MODES = {"dsi": orchestrator_pb2.MODE_DSI, "si": orchestrator_pb2.MODE_SI, "nonsi": orchestrator_pb2.MODE_NONSI}
VERIFICATIONS = {"coupled": common_pb2.VERIFICATION_COUPLED, "rejection": common_pb2.VERIFICATION_REJECTION}
FINISH = {
    orchestrator_pb2.FINISH_REASON_LENGTH: "length",
    orchestrator_pb2.FINISH_REASON_EOS: "eos",
    orchestrator_pb2.FINISH_REASON_STOP: "stop",
}


class DSIError(Exception):
    """A failed call: ``code`` is the grpc.StatusCode, ``details`` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc(cls, exc: grpc.RpcError) -> DSIError:
        return cls(exc.code(), exc.details() or "")  # type: ignore[attr-defined]


@dataclass(frozen=True)
class TokenInfo:
    token_id: int
    position: int
    from_draft: bool  # a draft the target accepted (else the target's own token)
    target: str  # the target instance that verified it


@dataclass(frozen=True)
class Delta:
    """One streamed message: tokens committed since the previous one and their text. The last delta
    carries ``finish_reason`` and ``stats``."""

    text: str
    tokens: list[TokenInfo]
    finish_reason: str | None = None
    stats: dict[str, Any] | None = None


@dataclass
class GenerateResult:
    text: str
    token_ids: list[int]
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                "stats": self.stats}


def build_request(
    prompt: str | Sequence[int],
    *,
    max_new_tokens: int = 64,
    mode: str | int = "dsi",
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float | None = None,
    seed: int | None = None,
    lookahead: int = 0,
    sp_degree: int = 0,
    verification: str = "coupled",
    stop: Sequence[str] = (),
    ignore_eos: bool = False,
    truncate_at_context: bool = False,
    request_id: str = "",
) -> orchestrator_pb2.GenerateRequest:
    if isinstance(mode, str):
        if mode not in MODES:
            raise DSIError(grpc.StatusCode.INVALID_ARGUMENT, f"mode: unknown mode {mode!r}; expected dsi, si or nonsi")
        mode = MODES[mode]
    if verification not in VERIFICATIONS:
        raise DSIError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"verification: unknown value {verification!r}; expected coupled or rejection",
        )
    req = orchestrator_pb2.GenerateRequest(
        request_id=request_id,
        max_new_tokens=max_new_tokens,
        mode=mode,  # type: ignore[arg-type]
        lookahead=lookahead,
        sp_degree=sp_degree,
        temperature=temperature,
        top_k=top_k,
        verification=VERIFICATIONS[verification],
        stop=list(stop),
        ignore_eos=ignore_eos,
        truncate_at_context=truncate_at_context,
    )
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.prompt_token_ids.extend(int(t) for t in prompt)
    if top_p is not None:
        req.top_p = top_p
    if seed is not None:
        req.seed = seed
    return req


def _delta(msg: orchestrator_pb2.GenerateResponse) -> Delta:
    tokens = [
        TokenInfo(t.token_id, t.position, t.source == orchestrator_pb2.TOKEN_SOURCE_DRAFT, t.target) for t in msg.tokens
    ]
    if msg.HasField("stats"):
        stats = MessageToDict(msg.stats, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        stats["seed"] = int(stats.get("seed", 0))
        return Delta(msg.text, tokens, FINISH.get(msg.finish_reason, ""), stats)
    return Delta(msg.text, tokens)


class _Collector:
    def __init__(self) -> None:
        self.result = GenerateResult(text="", token_ids=[])

    def add(self, d: Delta) -> None:
        self.result.text += d.text
        self.result.tokens.extend(d.tokens)
        self.result.token_ids.extend(t.token_id for t in d.tokens)
        if d.stats is not None:
            self.result.stats = d.stats
            self.result.finish_reason = d.finish_reason or ""


def _health_status(resp: health_pb2.HealthCheckResponse) -> bool:
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


class Client:
    """Blocking client. ``timeout`` (seconds) applies to each call.

    TLS: ``ca`` (CA certificate that signed the server's), ``cert`` + ``key`` (this client's certificate
    for mutual TLS), each a path or PEM bytes; ``tls=True`` alone trusts the system's CAs;
    ``server_name`` checks the server's certificate against that name instead of the address's host.
    ``api_key`` is sent as ``authorization: Bearer KEY`` with every call (health checks need none).
    A bad setting (an unreadable file, a certificate without its key) raises ``dsi.tls.CredentialsError``.
    """

    def __init__(
        self,
        address: str,
        timeout: float | None = None,
        *,
        ca: PemSource | None = None,
        cert: PemSource | None = None,
        key: PemSource | None = None,
        api_key: str | None = None,
        tls: bool = False,
        server_name: str = "",
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._metadata = bearer_metadata(api_key)
        self._channel = sync_channel(address, client_tls(ca, cert, key, tls, server_name))
        self._stub = orchestrator_pb2_grpc.OrchestratorServiceStub(self._channel)

    def stream(self, prompt: str | Sequence[int], **kwargs: Any) -> Iterator[Delta]:
        """Yield committed tokens (with their text) as soon as the orchestrator commits them."""
        call = self._stub.Generate(build_request(prompt, **kwargs), timeout=self.timeout, metadata=self._metadata)
        try:
            for msg in call:
                yield _delta(msg)
        except grpc.RpcError as exc:
            raise DSIError.from_rpc(exc) from None
        finally:
            call.cancel()

    def generate(self, prompt: str | Sequence[int], **kwargs: Any) -> GenerateResult:
        """Generate and return the whole result: ``.text``, ``.token_ids``, ``.stats``."""
        collector = _Collector()
        for d in self.stream(prompt, **kwargs):
            collector.add(d)
        return collector.result

    def info(self) -> dict[str, Any]:
        try:
            resp = self._stub.Info(orchestrator_pb2.OrchestratorInfoRequest(), timeout=self.timeout,
                                   metadata=self._metadata)
        except grpc.RpcError as exc:
            raise DSIError.from_rpc(exc) from None
        return MessageToDict(resp, preserving_proto_field_name=True)

    def health(self, service: str = "", timeout: float = 5.0) -> bool:
        """True when the server reports SERVING for service ('' = the whole server); False when it
        reports anything else or cannot be reached."""
        try:
            resp = health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return False
        return _health_status(resp)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client; create it inside the running event loop. The settings are ``Client``'s."""

    def __init__(
        self,
        address: str,
        timeout: float | None = None,
        *,
        ca: PemSource | None = None,
        cert: PemSource | None = None,
        key: PemSource | None = None,
        api_key: str | None = None,
        tls: bool = False,
        server_name: str = "",
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._metadata = bearer_metadata(api_key)
        self._channel = _aio_channel(address, client_tls(ca, cert, key, tls, server_name))
        self._stub = orchestrator_pb2_grpc.OrchestratorServiceStub(self._channel)

    async def stream(self, prompt: str | Sequence[int], **kwargs: Any) -> AsyncIterator[Delta]:
        call = self._stub.Generate(build_request(prompt, **kwargs), timeout=self.timeout, metadata=self._metadata)
        try:
            async for msg in call:
                yield _delta(msg)
        except grpc.aio.AioRpcError as exc:
            raise DSIError.from_rpc(exc) from None
        finally:
            call.cancel()

    async def generate(self, prompt: str | Sequence[int], **kwargs: Any) -> GenerateResult:
        collector = _Collector()
        async for d in self.stream(prompt, **kwargs):
            collector.add(d)
        return collector.result

    async def info(self) -> dict[str, Any]:
        try:
            resp = await self._stub.Info(orchestrator_pb2.OrchestratorInfoRequest(), timeout=self.timeout,
                                         metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise DSIError.from_rpc(exc) from None
        return MessageToDict(resp, preserving_proto_field_name=True)

    async def health(self, service: str = "", timeout: float = 5.0) -> bool:
        """As ``Client.health``."""
        try:
            resp = await health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return _health_status(resp)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
