"""In-process fake target services (real grpc.aio servers on loopback, port 0) for pool and discovery
tests: scripted Verify answers and failures, a health status the test sets, and a model Info."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dsi.v1 import common_pb2, target_pb2, target_pb2_grpc

TARGET_SERVICE = "dsi.v1.TargetService"


@dataclass
class Faults:
    """Failures shared by several fake targets: the next ``unavailable`` Verify calls, whichever
    target they reach, fail with UNAVAILABLE."""

    unavailable: int = 0


@dataclass
class VerifyCall:
    session_id: str
    first_position: int
    sequence_length: int  # prefix_length + the tokens sent
    failed: bool


@dataclass
class FakeTargetServer(target_pb2_grpc.TargetServiceServicer, health_pb2_grpc.HealthServicer):
    """One fake target. ``mode``: 'ok', 'unavailable' (every Verify fails with UNAVAILABLE) or
    'invalid' (INVALID_ARGUMENT). With ``hold`` set, Verify waits for it before answering."""

    faults: Faults = field(default_factory=Faults)
    mode: str = "ok"
    serving: bool = True
    vocab_size: int = 384
    vocab_fingerprint: str = "vocab-a"
    hold: asyncio.Event | None = None
    calls: list[VerifyCall] = field(default_factory=list)
    address: str = ""
    server: grpc.aio.Server | None = None

    async def start(self) -> str:
        self.server = grpc.aio.server()
        target_pb2_grpc.add_TargetServiceServicer_to_server(self, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.address = f"127.0.0.1:{port}"
        return self.address

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)

    @property
    def answered(self) -> int:
        return sum(not c.failed for c in self.calls)

    @property
    def failed(self) -> int:
        return sum(c.failed for c in self.calls)

    # -- TargetService ---------------------------------------------------------------------------

    async def Verify(  # noqa: N802 - gRPC's name
        self, request: target_pb2.VerifyRequest, context: grpc.aio.ServicerContext
    ) -> target_pb2.VerifyResponse:
        length = request.prefix_length + len(request.token_ids)
        fail = self.mode != "ok" or self.faults.unavailable > 0
        if self.mode == "ok" and self.faults.unavailable > 0:
            self.faults.unavailable -= 1
        self.calls.append(VerifyCall(request.session_id, request.first_position, length, fail))
        if fail:
            code = grpc.StatusCode.INVALID_ARGUMENT if self.mode == "invalid" else grpc.StatusCode.UNAVAILABLE
            await context.abort(code, f"fake target {self.address}: {self.mode}")
        if self.hold is not None:
            await self.hold.wait()
        # One token per scored position: first_position .. length.
        return target_pb2.VerifyResponse(token_ids=[7] * (length - request.first_position + 1))

    async def Info(  # noqa: N802
        self, request: target_pb2.TargetInfoRequest, context: grpc.aio.ServicerContext
    ) -> target_pb2.TargetInfoResponse:
        return target_pb2.TargetInfoResponse(model=common_pb2.ModelInfo(
            model="fake", vocab_size=self.vocab_size, vocab_fingerprint=self.vocab_fingerprint))

    async def Release(  # noqa: N802
        self, request: target_pb2.TargetReleaseRequest, context: grpc.aio.ServicerContext
    ) -> target_pb2.TargetReleaseResponse:
        return target_pb2.TargetReleaseResponse(released=True)

    # -- Health ----------------------------------------------------------------------------------

    async def Check(  # noqa: N802
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = health_pb2.HealthCheckResponse.SERVING if self.serving else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)


async def wait_for(condition, timeout_s: float = 10.0, what: str = "") -> None:  # type: ignore[no-untyped-def]
    """Poll ``condition()`` until it is true; fail after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.01)
