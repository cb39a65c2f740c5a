"""DrafterService servicer: protobuf in -> DrafterEngine -> protobuf stream out."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from dsi.v1 import common_pb2, drafter_pb2, drafter_pb2_grpc
from services.drafter.engine import DrafterEngine
from services.runtime.errors import grpc_errors
from services.runtime.model_server import counters_pb, model_info_pb, not_loaded
from services.runtime.validation import validate_draft


class DrafterServicer(drafter_pb2_grpc.DrafterServiceServicer):
    def __init__(self, engine: DrafterEngine | None, max_sequence_tokens: int, max_drafts: int) -> None:
        self.engine = engine
        self.max_sequence_tokens = max_sequence_tokens
        self.max_drafts = max_drafts

    def _engine(self) -> DrafterEngine:
        if self.engine is None:
            raise not_loaded("drafter")
        return self.engine

    @grpc_errors
    async def Draft(
        self, request: drafter_pb2.DraftRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[drafter_pb2.DraftResponse]:
        loaded = self._engine().runner.loaded
        sampling = validate_draft(request, loaded.vocab_size, self.max_sequence_tokens, self.max_drafts)
        drafts = self._engine().draft(
            request.session_id, list(request.token_ids), request.max_tokens, sampling, request.return_probs
        )
        async with contextlib.aclosing(drafts):  # a cancel while waiting in `yield` closes the engine too
            async for token in drafts:
                msg = drafter_pb2.DraftResponse(token_id=token.token_id, position=token.position)
                if token.probs is not None:
                    msg.probs.CopyFrom(common_pb2.SparseDistribution(token_ids=token.probs[0], probs=token.probs[1]))
                yield msg

    @grpc_errors
    async def Info(
        self, request: drafter_pb2.DrafterInfoRequest, context: grpc.aio.ServicerContext
    ) -> drafter_pb2.DrafterInfoResponse:
        runner = self._engine().runner
        return drafter_pb2.DrafterInfoResponse(
            model=model_info_pb(runner.loaded),
            counters=counters_pb(runner),
            oracle_acceptance=self._engine().oracle_acceptance,
        )

    @grpc_errors
    async def Release(
        self, request: drafter_pb2.DrafterReleaseRequest, context: grpc.aio.ServicerContext
    ) -> drafter_pb2.DrafterReleaseResponse:
        return drafter_pb2.DrafterReleaseResponse(released=await self._engine().release(request.session_id))
