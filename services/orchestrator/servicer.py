"""OrchestratorService servicer: protobuf in -> Orchestrator -> protobuf stream out."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from dsi.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc
from services.orchestrator.scheduler import Source
from services.orchestrator.service import Chunk, Orchestrator
from services.runtime.errors import Unavailable, grpc_errors
from services.runtime.validation import validate_generate

_FINISH = {
    "length": orchestrator_pb2.FINISH_REASON_LENGTH,
    "eos": orchestrator_pb2.FINISH_REASON_EOS,
    "stop": orchestrator_pb2.FINISH_REASON_STOP,
}
_SOURCE = {Source.DRAFT: orchestrator_pb2.TOKEN_SOURCE_DRAFT, Source.TARGET: orchestrator_pb2.TOKEN_SOURCE_TARGET}


def chunk_to_pb(chunk: Chunk) -> orchestrator_pb2.GenerateResponse:
    msg = orchestrator_pb2.GenerateResponse(text=chunk.text)
    for t in chunk.tokens:
        msg.tokens.add(token_id=t.token_id, position=t.position, source=_SOURCE[t.source], target=t.target)
    if chunk.stats is not None:
        s = chunk.stats
        msg.finish_reason = _FINISH[chunk.finish_reason]
        msg.stats.CopyFrom(
            orchestrator_pb2.GenerateStats(
                mode=s.mode,
                prompt_tokens=chunk.prompt_tokens,
                new_tokens=s.new_tokens,
                windows_dispatched=s.windows_dispatched,
                windows_applied=s.windows_applied,
                windows_cancelled=s.windows_cancelled,
                drafts_proposed=s.drafts_proposed,
                drafts_accepted=s.drafts_accepted,
                acceptance_rate=s.acceptance_rate,
                epochs=s.epochs,
                max_windows_in_flight=s.max_windows_in_flight,
                ttft_s=s.ttft_s,
                wall_s=s.wall_s,
                tokens_per_s=s.tokens_per_s,
                wasted_target_s=s.wasted_target_s,
                target_forwards=s.target_forwards,
                critical_queue_wait_s=s.critical_queue_wait_s,
                windows_preempted=s.windows_preempted,
                seed=chunk.seed,
                lookahead=s.lookahead,
                sp_degree=s.sp_degree,
                retries=s.retries,
                drafter_failed=s.drafter_failed,
                tokens_from_drafts=s.tokens_from_drafts,
                request_id=chunk.request_id,
            )
        )
    return msg


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    """Registered before the server starts; calls get UNAVAILABLE until ``attach`` is called."""

    def __init__(self) -> None:
        self.orchestrator: Orchestrator | None = None
        self.target_model = common_pb2.ModelInfo()
        self.drafter_model: common_pb2.ModelInfo | None = None
        self.drafter_address = ""

    def attach(
        self,
        orchestrator: Orchestrator,
        target_model: common_pb2.ModelInfo,
        drafter_model: common_pb2.ModelInfo | None,
        drafter_address: str,
    ) -> None:
        self.orchestrator = orchestrator
        self.target_model = target_model
        self.drafter_model = drafter_model
        self.drafter_address = drafter_address

    def _ready(self) -> Orchestrator:
        if self.orchestrator is None:
            raise Unavailable("the orchestrator is starting (waiting for targets); retry when health reports SERVING")
        return self.orchestrator

    @grpc_errors
    async def Generate(
        self, request: orchestrator_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[orchestrator_pb2.GenerateResponse]:
        orchestrator = self._ready()
        params = validate_generate(request, orchestrator.limits)
        # aclosing: a client that goes away while we wait in `yield` still stops the scheduler at once.
        async with contextlib.aclosing(orchestrator.generate(params)) as chunks:
            async for chunk in chunks:
                yield chunk_to_pb(chunk)

    @grpc_errors
    async def Info(
        self, request: orchestrator_pb2.OrchestratorInfoRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.OrchestratorInfoResponse:
        o = self._ready()
        msg = orchestrator_pb2.OrchestratorInfoResponse(
            target_model=self.target_model,
            drafter_address=self.drafter_address,
            max_new_tokens_limit=o.limits.max_new_tokens,
            max_prompt_tokens=o.limits.max_prompt_tokens,
            default_lookahead=o.limits.default_lookahead,
            max_lookahead=o.limits.max_lookahead,
            max_sequence_length=o.limits.max_sequence_length,
            max_prompt_bytes=o.limits.max_prompt_bytes,
            max_stop_strings=o.limits.max_stop_strings,
            max_stop_length=o.limits.max_stop_length,
        )
        if self.drafter_model is not None:
            msg.drafter_model.CopyFrom(self.drafter_model)
        for inst in o.pool.instances.values():
            msg.targets.add(address=inst.address, healthy=inst.healthy, in_flight=int(inst.busy))
        return msg
