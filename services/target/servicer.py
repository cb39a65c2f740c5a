"""TargetService servicer: protobuf in -> TargetEngine -> protobuf out."""

from __future__ import annotations

import grpc

from dsi.services.model.runner import Chunking
from dsi.services.model.server import counters_pb, model_info_pb, not_loaded
from dsi.services.runtime.errors import grpc_errors
from dsi.services.runtime.validation import validate_verify
from dsi.services.target.engine import TargetEngine, VerifyCall
from dsi.v1 import target_pb2, target_pb2_grpc


class TargetServicer(target_pb2_grpc.TargetServiceServicer):
    def __init__(self, engine: TargetEngine | None) -> None:
        self.engine = engine

    def _engine(self) -> TargetEngine:
        if self.engine is None:
            raise not_loaded("target")
        return self.engine

    @grpc_errors
    async def Verify(
        self, request: target_pb2.VerifyRequest, context: grpc.aio.ServicerContext
    ) -> target_pb2.VerifyResponse:
        runner = self._engine().runner
        loaded = runner.loaded
        sampling = validate_verify(request, loaded.vocab_size, runner.max_sequence_length)
        result = await self._engine().verify(
            VerifyCall(
                session_id=request.session_id,
                token_ids=list(request.token_ids),
                first_position=request.first_position,
                sampling=sampling,
                draft_probs=[(list(d.token_ids), list(d.probs)) for d in request.draft_probs],
                chunking=Chunking(request.chunk_origin, request.chunk_size) if request.chunk_size else None,
                prefix_length=request.prefix_length,
                prefix_hash=request.prefix_hash,
            )
        )
        return target_pb2.VerifyResponse(
            token_ids=result.token_ids,
            instance_id=loaded.instance_id,
            cached_tokens=result.cached_tokens,
            queue_s=result.queue_s,
            compute_s=result.compute_s,
        )

    @grpc_errors
    async def Info(
        self, request: target_pb2.TargetInfoRequest, context: grpc.aio.ServicerContext
    ) -> target_pb2.TargetInfoResponse:
        runner = self._engine().runner
        return target_pb2.TargetInfoResponse(model=model_info_pb(runner), counters=counters_pb(runner))

    @grpc_errors
    async def Release(
        self, request: target_pb2.TargetReleaseRequest, context: grpc.aio.ServicerContext
    ) -> target_pb2.TargetReleaseResponse:
        return target_pb2.TargetReleaseResponse(released=await self._engine().release(request.session_id))
