"""DrafterService servicer: protobuf in -> DrafterEngine -> protobuf stream out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from dsi.services.drafter.engine import DrafterEngine, DraftToken
from dsi.services.model.server import counters_pb, model_info_pb, not_loaded
from dsi.services.runtime.errors import InvalidArgument, grpc_errors
from dsi.services.runtime.validation import (
    validate_draft,
    validate_draft_grant,
    validate_urgent_until,
    validate_vocab_limit,
)
from dsi.v1 import common_pb2, drafter_pb2, drafter_pb2_grpc


class DrafterServicer(drafter_pb2_grpc.DrafterServiceServicer):
    def __init__(self, engine: DrafterEngine | None, max_drafts: int) -> None:
        self.engine = engine
        self.max_drafts = max_drafts

    def _engine(self) -> DrafterEngine:
        if self.engine is None:
            raise not_loaded("drafter")
        return self.engine

    @grpc_errors
    async def Draft(
        self, request: drafter_pb2.DraftRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[drafter_pb2.DraftResponse]:
        runner = self._engine().runner
        sampling = validate_draft(request, runner.loaded.vocab_size, runner.max_sequence_length, self.max_drafts)
        vocab_limit = validate_vocab_limit(request.vocab_limit)
        ids = list(request.token_ids)
        drafts = self._engine().draft(
            request.session_id, ids, request.max_tokens, sampling, request.return_probs, vocab_limit
        )
        async with contextlib.aclosing(drafts):  # a cancel while waiting in `yield` closes the engine too
            async for token in drafts:
                yield _response(token)

    @grpc_errors
    async def DraftFlow(
        self, request_iterator: AsyncIterator[drafter_pb2.DraftFlowRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[drafter_pb2.DraftResponse]:
        engine = self._engine()
        requests = request_iterator.__aiter__()
        first = await anext(requests, None)
        if first is None or first.WhichOneof("kind") != "start":
            raise InvalidArgument("start", "the first message must start the flow")
        start = first.start
        limit = engine.runner.max_sequence_length
        sampling = validate_draft(start, engine.runner.loaded.vocab_size, limit, self.max_drafts)
        vocab_limit = validate_vocab_limit(start.vocab_limit)
        flow = engine.flow(
            start.session_id,
            list(start.token_ids),
            start.max_tokens,
            sampling,
            start.return_probs,
            vocab_limit,
            order=start.order,
        )

        async def read_grants() -> None:
            try:
                async for msg in requests:
                    kind = msg.WhichOneof("kind")
                    if kind == "urgent_until":
                        flow.set_urgent(validate_urgent_until(msg.urgent_until))
                        continue
                    if kind != "grant":
                        raise InvalidArgument("grant", "every message after the first must be a grant or urgent_until")
                    credit, length = flow.snapshot()
                    flow.grant(
                        validate_draft_grant(msg.grant, credit, length, self.max_drafts, limit)
                    )
                # The caller half-closed (or cancelled: grpc ends the request stream first): no more
                # credit will come, so the flow ends once the credit it has is used.
                flow.end_grants()
            except Exception as exc:  # noqa: BLE001 - ends the call with its status (grpc_errors)
                flow.fail(exc)

        reader = asyncio.create_task(read_grants())
        try:
            async with contextlib.aclosing(flow.tokens()) as tokens:
                async for token in tokens:
                    yield _response(token)
        except asyncio.CancelledError:
            flow.count_cancel()  # also when the flow had already ended, idle, at the end of the requests
            raise
        finally:
            reader.cancel()
            # Awaited: no task outlives its call (gather raises only if *this* task is cancelled).
            await asyncio.gather(reader, return_exceptions=True)

    @grpc_errors
    async def Info(
        self, request: drafter_pb2.DrafterInfoRequest, context: grpc.aio.ServicerContext
    ) -> drafter_pb2.DrafterInfoResponse:
        runner = self._engine().runner
        return drafter_pb2.DrafterInfoResponse(
            model=model_info_pb(runner),
            counters=counters_pb(runner),
            oracle_acceptance=self._engine().oracle_acceptance,
        )

    @grpc_errors
    async def Release(
        self, request: drafter_pb2.DrafterReleaseRequest, context: grpc.aio.ServicerContext
    ) -> drafter_pb2.DrafterReleaseResponse:
        return drafter_pb2.DrafterReleaseResponse(released=await self._engine().release(request.session_id))


def _response(token: DraftToken) -> drafter_pb2.DraftResponse:
    msg = drafter_pb2.DraftResponse(token_id=token.token_id, position=token.position)
    if token.probs is not None:
        msg.probs.CopyFrom(common_pb2.SparseDistribution(token_ids=token.probs[0], probs=token.probs[1]))
    return msg
