"""The orchestrator's domain: turn a validated request into a scheduler run over the target pool and
the drafter, and its commits into text chunks with stop strings and EOS handled."""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from dsi.v1 import drafter_pb2_grpc
from services.orchestrator.admission import Admission
from services.orchestrator.detokenizer import IncrementalText
from services.orchestrator.drafter_client import GrpcDrafterClient
from services.orchestrator.metrics import OrchestratorMetrics
from services.orchestrator.pool import PoolTargetClient, TargetPool
from services.orchestrator.scheduler import CommittedToken, RequestStats, Scheduler, SchedulerConfig
from services.orchestrator.tokenizer import TextTokenizer
from services.runtime.validation import (
    GenerateLimits,
    GenerateParams,
    check_prompt_length,
    new_tokens_within_context,
    sampling_to_pb,
)

log = logging.getLogger(__name__)


@dataclass
class Chunk:
    """Tokens committed since the last chunk and their text; the last chunk has the finish reason."""

    tokens: list[CommittedToken] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""  # "length", "eos" or "stop" on the last chunk
    stats: RequestStats | None = None
    seed: int = 0
    prompt_tokens: int = 0
    request_id: str = ""


class Orchestrator:
    def __init__(
        self,
        pool: TargetPool,
        drafter_stub: drafter_pb2_grpc.DrafterServiceStub | None,
        tokenizer: TextTokenizer,
        limits: GenerateLimits,
        eos_token_ids: list[int],
        deadline_s: float,
        metrics: OrchestratorMetrics,
        reproducible: bool = False,
        drafter_stall_s: float = 0.0,
        admission: Admission | None = None,
    ) -> None:
        self.pool = pool
        self.drafter_stub = drafter_stub
        self.tokenizer = tokenizer
        self.limits = limits
        self.eos = set(eos_token_ids)
        self.deadline_s = deadline_s
        self.metrics = metrics
        self.reproducible = reproducible
        self.drafter_stall_s = drafter_stall_s
        self.admission = admission or Admission(max_active=1 << 30, max_queued=0, max_wait_s=0.0)
        self._background: set[asyncio.Task[None]] = set()
        self._seq = itertools.count()

    def tokenize(self, params: GenerateParams) -> list[int]:
        if params.prompt_token_ids is not None:
            return list(params.prompt_token_ids)
        ids = self.tokenizer.encode(params.prompt)
        check_prompt_length(len(ids), self.limits)
        return ids

    async def generate(self, params: GenerateParams) -> AsyncGenerator[Chunk, None]:
        """Run one request once it is admitted (``Admission``: bounded concurrency and queue)."""
        async with self.admission.slot():
            async for chunk in self._generate(params):
                yield chunk

    async def _generate(self, params: GenerateParams) -> AsyncGenerator[Chunk, None]:
        request_id = params.request_id or uuid.uuid4().hex[:16]
        # Off the event loop: other requests' tokens keep streaming while a long prompt is encoded.
        prompt = await asyncio.to_thread(self.tokenize, params)
        max_new_tokens = new_tokens_within_context(len(prompt), params, self.limits)
        sampling = sampling_to_pb(params.sampling)
        request_seq = next(self._seq)
        drafter = None
        if self.drafter_stub is not None and params.mode != "nonsi":
            drafter = GrpcDrafterClient(
                self.drafter_stub,
                sampling,
                request_id,
                self.deadline_s,
                vocab_limit=self.limits.vocab_size,
                stall_s=self.drafter_stall_s,
                order=request_seq,
            )
        scheduler = Scheduler(
            PoolTargetClient(
                self.pool, sampling, request_id, (len(prompt), params.lookahead + 1) if self.reproducible else None
            ),
            drafter,
            SchedulerConfig(
                mode=params.mode,
                lookahead=params.lookahead,
                sp_degree=params.sp_degree,
                max_new_tokens=max_new_tokens,
                rejection=params.sampling.rejection,
                draft_sequence_length=self.limits.draft_sequence_length,
            ),
            session_id=request_id,
            request_seq=request_seq,
        )
        text = IncrementalText(self.tokenizer, params.stop)
        queue: asyncio.Queue[tuple[CommittedToken, str]] = asyncio.Queue()
        finish = {"reason": "length"}

        def on_commit(token: CommittedToken) -> bool:
            delta = text.push(token.token_id)
            queue.put_nowait((token, delta))
            if token.token_id in self.eos and not params.ignore_eos:
                finish["reason"] = "eos"
                return True
            if text.stopped_at is not None:
                finish["reason"] = "stop"
                return True
            return False

        run = asyncio.ensure_future(scheduler.run(prompt, on_commit))
        outcome = "error"
        try:
            while not (run.done() and queue.empty()):
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, run}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                chunk = Chunk()
                token, delta = getter.result()
                chunk.tokens.append(token)
                chunk.text += delta
                while not queue.empty():  # batch what is already committed into one message
                    token, delta = queue.get_nowait()
                    chunk.tokens.append(token)
                    chunk.text += delta
                yield chunk
            stats = run.result()  # raises what the scheduler raised
            outcome = "ok"
            yield Chunk(
                text=text.finish(),
                finish_reason=finish["reason"],
                stats=stats,
                seed=params.sampling.seed,
                prompt_tokens=len(prompt),
                request_id=request_id,
            )
        finally:
            try:
                if not run.done():
                    run.cancel()
                    outcome = "cancelled"
                    # Lets the scheduler cancel its windows; raises if *this* generator is cancelled.
                    await asyncio.wait({run})
            finally:
                self.metrics.observe(scheduler.stats, outcome)
                release = asyncio.create_task(self._release(request_id))
                self._background.add(release)  # a reference, so the task is not collected mid-way
                release.add_done_callback(self._background.discard)

    async def _release(self, session_id: str) -> None:
        from dsi.v1 import drafter_pb2

        await self.pool.release_session(session_id)
        if self.drafter_stub is not None:
            try:
                await self.drafter_stub.Release(drafter_pb2.DrafterReleaseRequest(session_id=session_id), timeout=5.0)
            except Exception:  # noqa: BLE001 - best effort; the drafter's TTL cleans up
                pass
