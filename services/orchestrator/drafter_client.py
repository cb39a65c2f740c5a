"""The scheduler's DrafterClient over gRPC: one server stream per drafter run, cancelled for real."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from dsi.v1 import common_pb2, drafter_pb2, drafter_pb2_grpc
from services.orchestrator.scheduler import Draft


class GrpcDraftStream:
    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        self.call = call

    async def __aiter__(self) -> AsyncIterator[Draft]:  # type: ignore[override]
        async for msg in self.call:
            probs = (list(msg.probs.token_ids), list(msg.probs.probs)) if msg.HasField("probs") else None
            yield Draft(msg.token_id, probs)

    def cancel(self) -> None:
        # Breaking out of `async for` does not cancel a grpc.aio stream; this does.
        self.call.cancel()


class GrpcDrafterClient:
    def __init__(
        self,
        stub: drafter_pb2_grpc.DrafterServiceStub,
        sampling: common_pb2.SamplingParams,
        request_id: str,
        deadline_s: float,
    ) -> None:
        self.stub = stub
        self.sampling = sampling
        self.request_id = request_id
        self.deadline_s = deadline_s

    def open(self, session_id: str, prefix: list[int], max_tokens: int, return_probs: bool) -> GrpcDraftStream:
        request = drafter_pb2.DraftRequest(
            request_id=self.request_id,
            session_id=session_id,
            token_ids=prefix,
            max_tokens=max_tokens,
            sampling=self.sampling,
            return_probs=return_probs,
        )
        return GrpcDraftStream(self.stub.Draft(request, timeout=self.deadline_s))
