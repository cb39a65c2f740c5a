"""The orchestrator's domain: turn a validated request into a scheduler run over the target pool and
the drafter, and its commits into text chunks with stop strings and EOS handled."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace

from dsi.services.orchestrator.admission import Admission
from dsi.services.orchestrator.detokenizer import IncrementalText
from dsi.services.orchestrator.drafter_client import Drafter
from dsi.services.orchestrator.metrics import OrchestratorMetrics
from dsi.services.orchestrator.pool import PoolTargetClient, TargetPool
from dsi.services.orchestrator.scheduler import CommittedToken, RequestStats, Scheduler, SchedulerConfig
from dsi.services.orchestrator.tokenizer import TextTokenizer
from dsi.services.orchestrator.tuning import Choice, Tuner
from dsi.services.runtime.params import FinishReason, Mode
from dsi.services.runtime.validation import (
    AUTO_SP,
    GenerateLimits,
    GenerateParams,
    check_prompt_length,
    new_tokens_within_context,
)

log = logging.getLogger(__name__)


@dataclass
class Chunk:
    """Tokens committed since the last chunk and their text; the last chunk has the finish reason."""

    tokens: list[CommittedToken] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None  # on the last chunk
    stats: RequestStats | None = None
    seed: int = 0
    prompt_tokens: int = 0
    request_id: str = ""


class _Output:
    """A scheduler run's commits as chunks: text with stop strings held back, the end at EOS or at a
    stop string. Commits arrive from the scheduler's callback; ``chunks`` batches what has arrived
    since the consumer last took a chunk, until the run is over."""

    def __init__(self, tokenizer: TextTokenizer, params: GenerateParams, eos: set[int]) -> None:
        self.text = IncrementalText(tokenizer, params.stop)
        self.eos = set() if params.ignore_eos else eos
        self.finish_reason = FinishReason.LENGTH
        self._pending = Chunk()
        self._ready = asyncio.Event()
        self._over = False

    def on_commit(self, token: CommittedToken) -> bool:
        """The scheduler's callback: True ends the request."""
        self._pending.tokens.append(token)
        self._pending.text += self.text.push(token.token_id)
        self._ready.set()
        if token.token_id in self.eos:
            self.finish_reason = FinishReason.EOS
            return True
        if self.text.stopped_at is not None:
            self.finish_reason = FinishReason.STOP
            return True
        return False

    def run_over(self, _task: object = None) -> None:
        self._over = True
        self._ready.set()

    async def chunks(self) -> AsyncGenerator[Chunk, None]:
        while self._pending.tokens or not self._over:
            if not self._pending.tokens:
                await self._ready.wait()
                self._ready.clear()
                continue
            chunk, self._pending = self._pending, Chunk()
            yield chunk


class Orchestrator:
    def __init__(
        self,
        pool: TargetPool,
        drafter: Drafter | None,
        tokenizer: TextTokenizer,
        limits: GenerateLimits,
        eos_token_ids: list[int],
        metrics: OrchestratorMetrics,
        reproducible: bool = False,
        admission: Admission | None = None,
        tuner: Tuner | None = None,
        yielding: bool = True,
    ) -> None:
        self.pool = pool
        self.drafter = drafter
        self.tokenizer = tokenizer
        self.limits = limits
        self.eos = set(eos_token_ids)
        self.metrics = metrics
        self.reproducible = reproducible
        # Short critical windows held back for other requests go out as yielding windows.
        self.yielding = yielding
        self.admission = admission or Admission(max_active=1 << 30, max_queued=0, max_wait_s=0.0)
        # Chooses lookahead and SP degree for requests that leave them to the server's 'auto'.
        self.tuner = tuner or Tuner(limits.max_lookahead)
        self._tuning: asyncio.Task[Choice] | None = None  # a simulation of a new point, in the background
        # Session releases still running after their request ended (awaited by ``close``).
        self._releases: set[asyncio.Task[None]] = set()
        self._seq = itertools.count()

    def tokenize(self, params: GenerateParams) -> list[int]:
        if params.prompt_token_ids is not None:
            return list(params.prompt_token_ids)
        ids = self.tokenizer.encode(params.prompt)
        check_prompt_length(len(ids), self.limits)
        return ids

    async def generate(self, params: GenerateParams) -> AsyncGenerator[Chunk, None]:
        """Run one request once it is admitted (``Admission``: bounded concurrency and queue)."""
        # aclosing: a consumer that goes away closes _generate here, inside the slot, so the run is
        # cancelled and awaited before the slot is freed (not later, by the event loop's finaliser).
        async with self.admission.slot(), contextlib.aclosing(self._generate(params)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _tuned(self, params: GenerateParams) -> tuple[GenerateParams, bool]:
        """The request with an automatic lookahead or SP degree chosen; whether one was chosen from
        measurements (rather than the fallback, before there are any)."""
        auto_lookahead, auto_sp = params.lookahead == 0, params.sp_degree == AUTO_SP
        if not (auto_lookahead or auto_sp):
            return params, False
        targets = self.pool.sp_limit()
        if params.mode is Mode.SI:
            choice: Choice | None = self.tuner.choose_si()
        else:
            # A fixed SP degree (0: every healthy target) gets the lookahead best for it.
            sp = None if auto_sp else (min(params.sp_degree, targets) if params.sp_degree > 0 else targets)
            choice, stale = self.tuner.lookup(targets, sp)
            if choice is None:  # the very first choice: simulate it now, off the event loop
                choice = await asyncio.to_thread(self.tuner.choose, targets, sp)
            elif stale and self._tuning is None:  # the estimates moved: simulate the new point meanwhile
                self._tuning = asyncio.create_task(asyncio.to_thread(self.tuner.choose, targets, sp))
                self._tuning.add_done_callback(self._tuned_in_background)
        assert choice is not None
        return replace(
            params,
            lookahead=choice.lookahead if auto_lookahead else params.lookahead,
            sp_degree=choice.sp if auto_sp else params.sp_degree,
        ), choice.auto

    def _tuned_in_background(self, task: asyncio.Task[Choice]) -> None:
        self._tuning = None
        if not task.cancelled() and task.exception() is not None:
            log.warning("choosing the lookahead failed: %s", task.exception())

    def _scheduler(self, params: GenerateParams, prompt: list[int], request_id: str) -> Scheduler:
        request_seq = next(self._seq)
        drafter = None
        if self.drafter is not None and params.mode is not Mode.NONSI:
            drafter = self.drafter.client(params.sampling, request_id, request_seq)
        chunking = (len(prompt), params.lookahead + 1) if self.reproducible else None
        return Scheduler(
            PoolTargetClient(self.pool, params.sampling, request_id, chunking),
            drafter,
            SchedulerConfig(
                mode=params.mode,
                lookahead=params.lookahead,
                sp_degree=params.sp_degree,
                max_new_tokens=new_tokens_within_context(len(prompt), params, self.limits),
                rejection=params.sampling.rejection,
                draft_sequence_length=self.limits.draft_sequence_length,
                yielding=self.yielding,
            ),
            session_id=request_id,
            request_seq=request_seq,
        )

    async def _generate(self, params: GenerateParams) -> AsyncGenerator[Chunk, None]:
        request_id = params.request_id or uuid.uuid4().hex[:16]
        # Off the event loop: other requests' tokens keep streaming while a long prompt is encoded.
        prompt = await asyncio.to_thread(self.tokenize, params)
        params, tuned = await self._tuned(params)
        scheduler = self._scheduler(params, prompt, request_id)
        scheduler.stats.auto_tuned = tuned
        output = _Output(self.tokenizer, params, self.eos)
        run = asyncio.create_task(scheduler.run(prompt, output.on_commit))
        run.add_done_callback(output.run_over)
        outcome = "error"
        try:
            async for chunk in output.chunks():
                yield chunk
            stats = run.result()  # raises what the scheduler raised
            outcome = "ok"
            self.tuner.estimates.request(stats.drafts_accepted, stats.drafts_verified)
            yield Chunk(text=output.text.finish(), finish_reason=output.finish_reason, stats=stats,
                        seed=params.sampling.seed, prompt_tokens=len(prompt), request_id=request_id)
        finally:
            try:
                if not run.done():
                    outcome = "cancelled"
                    run.cancel()
                    # Lets the scheduler cancel its windows; raises if *this* generator is cancelled.
                    await asyncio.wait({run})
                elif not run.cancelled():
                    run.exception()  # retrieved (raised above, or the consumer left first)
            finally:
                self.metrics.observe(scheduler.stats, outcome)
                release = asyncio.create_task(self._release(request_id))
                self._releases.add(release)  # owned until done, and awaited by close()
                release.add_done_callback(self._releases.discard)

    async def _release(self, session_id: str) -> None:
        """Every target instance and the drafter drop the request's session (best effort: a service
        that does not answer drops it at its time-to-live)."""
        await asyncio.gather(
            self.pool.release_session(session_id),
            *([self.drafter.release(session_id)] if self.drafter is not None else []),
            return_exceptions=True,
        )

    async def close(self) -> None:
        """Wait for the releases and the tuning still running (at shutdown, before the channels close)."""
        while self._releases or self._tuning is not None:
            await asyncio.gather(*self._releases, *([self._tuning] if self._tuning else []), return_exceptions=True)
