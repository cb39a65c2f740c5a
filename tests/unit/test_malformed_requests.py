"""Undecodable request messages (services/runtime/serving.py ``MalformedRequestGuard``): INVALID_ARGUMENT
on every kind of method, the generated handlers, health and reflection alike, and no traceback in the logs;
valid messages still reach the servicer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dsi.services.runtime.errors import InvalidArgument, grpc_errors
from dsi.services.runtime.serving import GrpcServer, ServerOptions, UndecodableRequest, decode_or_mark
from dsi.v1 import drafter_pb2, drafter_pb2_grpc, target_pb2, target_pb2_grpc

pytestmark = pytest.mark.unit

# Each fails to parse as any message: a corrupt varint, a truncated length-delimited field.
GARBAGE = [b"\xff" * 6, b"\x0a\x05ab"]
# Fails to parse where field 1 is a string (not UTF-8); an unknown field elsewhere (e.g. an Info request).
BAD_UTF8 = b"\x0a\x01\xff"
TARGET = "/dsi.v1.TargetService/"
DRAFTER = "/dsi.v1.DrafterService/"


class FakeTarget(target_pb2_grpc.TargetServiceServicer):
    @grpc_errors
    async def Verify(self, request: target_pb2.VerifyRequest, context: grpc.aio.ServicerContext) -> Any:
        if not request.token_ids:
            raise InvalidArgument("token_ids", "must not be empty")
        return target_pb2.VerifyResponse(token_ids=list(request.token_ids), instance_id="fake")

    @grpc_errors
    async def Info(self, request: target_pb2.TargetInfoRequest, context: grpc.aio.ServicerContext) -> Any:
        return target_pb2.TargetInfoResponse()


class FakeDrafter(drafter_pb2_grpc.DrafterServiceServicer):
    @grpc_errors
    async def Draft(self, request: drafter_pb2.DraftRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        for i in range(request.max_tokens):
            yield drafter_pb2.DraftResponse(token_id=i, position=i)

    @grpc_errors
    async def DraftFlow(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        # Reads grants in another task, as the real drafter does, and answers one draft per grant.
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def read() -> None:
            try:
                async for msg in requests:
                    await queue.put(msg)
                await queue.put(None)
            except Exception as exc:  # noqa: BLE001 - handed to the handler task, like DraftFlow
                await queue.put(exc)

        reader = asyncio.ensure_future(read())
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                for _ in range(max(1, item.grant // 10)):  # big grants: busy writing when a bad message comes
                    yield drafter_pb2.DraftResponse(token_id=item.grant)
        finally:
            reader.cancel()


def run_with_server(check: Callable[[grpc.aio.Channel], Awaitable[None]]) -> None:
    async def main() -> None:
        server = GrpcServer(ServerOptions(), [target_pb2.DESCRIPTOR.services_by_name["TargetService"].full_name,
                                              drafter_pb2.DESCRIPTOR.services_by_name["DrafterService"].full_name],
                            "test")
        target_pb2_grpc.add_TargetServiceServicer_to_server(FakeTarget(), server.server)
        drafter_pb2_grpc.add_DrafterServiceServicer_to_server(FakeDrafter(), server.server)
        port = await server.start()
        await server.set_serving()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await check(channel)
        finally:
            await server.server.stop(None)

    asyncio.run(main())


async def expect_invalid(call: Any) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.value.code(), err.value.details())
    return str(err.value.details())


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    noisy = [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
    assert not noisy, [r.getMessage() for r in noisy]


def test_decode_or_mark_returns_the_message_or_a_marker() -> None:
    decode = decode_or_mark(target_pb2.VerifyRequest.FromString, "/dsi.v1.TargetService/Verify")
    msg = target_pb2.VerifyRequest(request_id="r", token_ids=[1, 2])
    assert decode(msg.SerializeToString()) == msg
    for data in [*GARBAGE, BAD_UTF8]:
        marked = decode(data)
        assert isinstance(marked, UndecodableRequest)
        assert marked.method == "/dsi.v1.TargetService/Verify" and marked.error.startswith("DecodeError")
        assert marked.details.startswith("request: ")


def test_undecodable_unary_and_server_streaming_requests_are_invalid_argument(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)

    async def check(channel: grpc.aio.Channel) -> None:
        unary = [TARGET + "Verify", TARGET + "Info", TARGET + "Release", DRAFTER + "Info", DRAFTER + "Release",
                 "/grpc.health.v1.Health/Check"]
        streaming = [DRAFTER + "Draft", "/grpc.health.v1.Health/Watch"]
        string_first = {TARGET + "Verify", TARGET + "Release", DRAFTER + "Release", DRAFTER + "Draft",
                        "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"}
        for method in unary + streaming:
            make = channel.unary_stream if method in streaming else channel.unary_unary
            for data in GARBAGE + ([BAD_UTF8] if method in string_first else []):
                details = await expect_invalid(make(method)(data, timeout=10))
                assert details.startswith("request: ") and method in details
        # An unknown field is not an error (forward compatibility): the servicer answers.
        await channel.unary_unary(TARGET + "Info")(BAD_UTF8, timeout=10)
        # A generated UNIMPLEMENTED stub (Health/List where the health servicer lacks it): no traceback.
        try:
            await channel.unary_unary("/grpc.health.v1.Health/List")(b"", timeout=10)
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.UNIMPLEMENTED, err
        # Valid messages still reach the servicers, and their own validation keeps its message.
        target = target_pb2_grpc.TargetServiceStub(channel)
        assert list((await target.Verify(target_pb2.VerifyRequest(token_ids=[3, 4]), timeout=10)).token_ids) == [3, 4]
        details = await expect_invalid(target.Verify(target_pb2.VerifyRequest(), timeout=10))
        assert details.startswith("token_ids")
        drafts = drafter_pb2_grpc.DrafterServiceStub(channel).Draft(drafter_pb2.DraftRequest(max_tokens=3), timeout=10)
        assert [r.token_id async for r in drafts] == [0, 1, 2]
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    run_with_server(check)
    no_tracebacks(caplog)


def test_undecodable_messages_on_client_streams_are_invalid_argument(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    good = drafter_pb2.DraftFlowRequest(grant=5).SerializeToString()

    async def check(channel: grpc.aio.Channel) -> None:
        flow = channel.stream_stream(DRAFTER + "DraftFlow")
        reflection = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
        for data in [*GARBAGE, BAD_UTF8]:
            # A bad first message, and a bad message after good ones (answered first).
            await expect_invalid(flow(iter([data]), timeout=10))
            call = flow(timeout=10)
            await call.write(good)
            assert drafter_pb2.DraftResponse.FromString(await call.read()).token_id == 5
            await call.write(data)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # A bad message read (in the reader task) while the handler writes responses.
            await expect_invalid(flow(iter([drafter_pb2.DraftFlowRequest(grant=5000).SerializeToString(), data]),
                                      timeout=10))
            details = await expect_invalid(reflection(iter([data]), timeout=10))
            assert "ServerReflectionInfo" in details
        # A good flow still works end to end.
        stub = drafter_pb2_grpc.DrafterServiceStub(channel)
        requests = [drafter_pb2.DraftFlowRequest(grant=g) for g in (1, 2, 3)]
        assert [r.token_id async for r in stub.DraftFlow(iter(requests), timeout=10)] == [1, 2, 3]

    run_with_server(check)
    no_tracebacks(caplog)
