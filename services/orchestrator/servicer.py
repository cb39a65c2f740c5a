"""OrchestratorService servicer: protobuf in -> Orchestrator -> protobuf stream out. Unless told to
expose internals, what it says names no internal endpoint or path: targets are labelled
('target-1', ...), models go by their public names, and failures of the targets or the drafter reach
the caller as generic messages (the full ones are logged)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import grpc

from dsi.services.orchestrator.scheduler import Source
from dsi.services.orchestrator.service import Chunk, Orchestrator
from dsi.services.runtime.disclosure import EndpointLabels, public_model_name
from dsi.services.runtime.errors import ClientMessages, Unavailable, grpc_errors
from dsi.services.runtime.params import FinishReason
from dsi.services.runtime.serving import MAX_MESSAGE_BYTES
from dsi.services.runtime.validation import validate_generate
from dsi.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc

_FINISH = {
    FinishReason.LENGTH: orchestrator_pb2.FINISH_REASON_LENGTH,
    FinishReason.EOS: orchestrator_pb2.FINISH_REASON_EOS,
    FinishReason.STOP: orchestrator_pb2.FINISH_REASON_STOP,
}
STARTING = "the orchestrator is starting (waiting for targets); retry when health reports SERVING"
_SOURCE = {Source.DRAFT: orchestrator_pb2.TOKEN_SOURCE_DRAFT, Source.TARGET: orchestrator_pb2.TOKEN_SOURCE_TARGET}


def _same(address: str) -> str:
    return address


def chunk_to_pb(chunk: Chunk, target_name: Callable[[str], str] = _same) -> orchestrator_pb2.GenerateResponse:
    """A chunk as a stream message; ``target_name`` says how the verifying target is named (its address,
    or a public label)."""
    msg = orchestrator_pb2.GenerateResponse(text=chunk.text)
    for t in chunk.tokens:
        msg.tokens.add(token_id=t.token_id, position=t.position, source=_SOURCE[t.source],
                       target=target_name(t.target))
    if chunk.stats is not None:
        s = chunk.stats
        assert chunk.finish_reason is not None  # the last chunk carries both
        msg.finish_reason = _FINISH[chunk.finish_reason]
        msg.stats.CopyFrom(
            orchestrator_pb2.GenerateStats(
                mode=s.mode.value,
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
                windows_yielding=s.windows_yielding,
                windows_dropped=s.windows_dropped,
                seed=chunk.seed,
                lookahead=s.lookahead,
                sp_degree=s.sp_degree,
                auto_tuned=s.auto_tuned,
                retries=s.retries,
                drafter_failed=s.drafter_failed,
                tokens_from_drafts=s.tokens_from_drafts,
                request_id=chunk.request_id,
            )
        )
    return msg


def public_model_info(model: common_pb2.ModelInfo) -> common_pb2.ModelInfo:
    """A model's Info with its public name instead of its checkpoint path."""
    out = common_pb2.ModelInfo()
    out.CopyFrom(model)
    out.model = public_model_name(model.model) if model.model else ""
    return out


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServiceServicer, ClientMessages):
    """Registered before the server starts; calls get UNAVAILABLE until ``attach`` is called.

    With ``expose_internals`` off (the default), Info and the token stream name targets by label and
    models by public name, the drafter's address is left empty, and ``client_message`` keeps the
    targets' and the drafter's failures (which name their addresses) out of what callers are told."""

    def __init__(self, expose_internals: bool = False, max_request_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.expose_internals = expose_internals
        self.max_request_bytes = max_request_bytes  # what the server accepts (reported by Info)
        self.orchestrator: Orchestrator | None = None
        self.target_model = common_pb2.ModelInfo()
        self.drafter_model: common_pb2.ModelInfo | None = None
        self.drafter_address = ""
        self.target_name: Callable[[str], str] = _same if expose_internals else EndpointLabels("target")

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
        for address in orchestrator.pool.addresses:  # labels in the order the targets were configured
            self.target_name(address)

    def _ready(self) -> Orchestrator:
        if self.orchestrator is None:
            raise Unavailable(STARTING)
        return self.orchestrator

    def client_message(self, exc: Exception, code: grpc.StatusCode, message: str) -> str:
        """The orchestrator's own refusals (bad input, overload, still starting) as they are; a failure
        of the targets or the drafter (its message names their endpoints) or an unexpected error as a
        generic message: the full one is in the log with the request id."""
        if self.expose_internals:
            return message
        if isinstance(exc, Unavailable):
            if self.orchestrator is None:
                return STARTING
            instances = self.orchestrator.pool.snapshot()
            healthy = sum(1 for i in instances if i.healthy)
            return f"no target instance reachable ({healthy} of {len(instances)} healthy); retry later"
        if isinstance(exc, grpc.aio.AioRpcError):
            return f"a model service call failed ({code.name}); retry later"
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            return "internal error (logged by the orchestrator with the request id)"
        return message

    @grpc_errors
    async def Generate(
        self, request: orchestrator_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[orchestrator_pb2.GenerateResponse]:
        orchestrator = self._ready()
        params = validate_generate(request, orchestrator.limits)
        # aclosing: a client that goes away while we wait in `yield` still stops the scheduler at once.
        async with contextlib.aclosing(orchestrator.generate(params)) as chunks:
            async for chunk in chunks:
                yield chunk_to_pb(chunk, self.target_name)

    @grpc_errors
    async def Info(
        self, request: orchestrator_pb2.OrchestratorInfoRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.OrchestratorInfoResponse:
        o = self._ready()
        internals = self.expose_internals
        msg = orchestrator_pb2.OrchestratorInfoResponse(
            target_model=self.target_model if internals else public_model_info(self.target_model),
            drafter_address=self.drafter_address if internals else "",
            max_new_tokens_limit=o.limits.max_new_tokens,
            max_prompt_tokens=o.limits.max_prompt_tokens,
            default_lookahead=o.limits.default_lookahead,
            max_lookahead=o.limits.max_lookahead,
            max_sequence_length=o.limits.max_sequence_length,
            max_prompt_bytes=o.limits.max_prompt_bytes,
            max_stop_strings=o.limits.max_stop_strings,
            max_stop_length=o.limits.max_stop_length,
            max_request_id_length=o.limits.max_request_id_length,
            max_request_bytes=self.max_request_bytes,
        )
        if self.drafter_model is not None:
            msg.drafter_model.CopyFrom(self.drafter_model if internals else public_model_info(self.drafter_model))
        for inst in o.pool.snapshot():
            msg.targets.add(address=self.target_name(inst.address), healthy=inst.healthy, in_flight=int(inst.busy))
        return msg
