"""The drafter's domain logic: propose tokens one at a time from a prefix.

A benchmark-only *oracle* mode (``oracle_acceptance`` = a) serves the target model and proposes its
greedy token with probability a and its second-best token otherwise, independently per position,
to sweep acceptance rates in benchmarks. It is labelled as such in ``Info`` and in benchmark output.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import AsyncGenerator
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from dsi.services.model.runner import ForwardCancelled, Job, ModelRunner
from dsi.services.model.sampling import (
    Sampling,
    coupled_choice,
    draft_sample,
    sparse_from_dense,
    uniform_noise,
)
from dsi.services.model.worker import BACKGROUND, URGENT, Priority

_SALT_ORACLE = 0x3C6EF372


@dataclass
class DraftToken:
    token_id: int
    position: int
    probs: tuple[list[int], list[float]] | None = None


class DraftFlow:
    """Drafts continuing a prefix for as long as the caller grants credit.

    Each draft step is queued on the model's worker thread by the step before it, as soon as that
    one finishes, so drafting runs at model speed with no event-loop round trip between drafts; the
    event loop only receives the tokens. With no credit left the flow idles (freeing the worker for
    other sessions) until ``grant``; ``end_grants`` lets it finish once the credit is used; ``close``
    stops it before the next token (mid-forward when one is running). ``set_urgent`` marks which
    drafts the caller needs next: the worker runs every flow's urgent steps before background ones.
    """

    def __init__(
        self,
        engine: DrafterEngine,
        session_id: str,
        token_ids: list[int],
        credit: int,
        sampling: Sampling,
        return_probs: bool,
        vocab_limit: int = 0,
        order: int = 0,
    ) -> None:
        self._engine = engine
        self._session_id = session_id
        self._seq = list(token_ids)
        self._sampling = sampling
        self._return_probs = return_probs
        self._vocab_limit = vocab_limit
        self._order = order  # among flows' steps of one urgency, lower goes first (request age)
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[DraftToken | BaseException | None] = asyncio.Queue()
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._credit = 0
        self._urgent_until = 0  # drafts making the sequence at most this long are urgent (0 = all)
        self._job: Job | None = None  # the step queued or running
        self._running = False  # a step is queued or running on the worker
        self._grants_ended = False
        self._finished = False  # the end (None) or an error was queued
        self._cancel_counted = False
        engine.runner.counters.calls += 1
        self.grant(credit)

    def snapshot(self) -> tuple[int, int]:
        """(drafts granted and not produced yet, tokens in the sequence so far), read together: their
        sum only grows with grants."""
        with self._lock:
            return self._credit, len(self._seq)

    def grant(self, n: int) -> None:
        """Allow n more drafts."""
        with self._lock:
            self._credit += n
            start = not self._running and self._credit > 0 and not self._cancel.is_set()
            self._running = self._running or start
        if start:
            self._submit()

    def set_urgent(self, until: int) -> None:
        """Drafts that make the sequence at most ``until`` tokens long are urgent, later ones are
        background work (0: all urgent). A queued step takes its new priority at once."""
        with self._lock:
            self._urgent_until = max(0, until)
            if self._job is not None:
                self._job.priority = self._priority()
        self._engine.runner.reprioritized()

    def _priority(self) -> Priority:
        # The next draft makes the sequence len(seq) + 1 tokens long.
        urgent = self._urgent_until == 0 or len(self._seq) + 1 <= self._urgent_until
        return (URGENT if urgent else BACKGROUND, self._order)

    def end_grants(self) -> None:
        """No more grants will come: the flow ends when its credit is used."""
        with self._lock:
            self._grants_ended = True
            end = not self._running and self._credit == 0
        if end:
            self._finish(None)

    def fail(self, exc: BaseException) -> None:
        """End the flow with this error (e.g. an invalid grant) and stop drafting."""
        self._stop()
        self._finish(exc)

    def close(self) -> None:
        """Stop drafting: a queued step never starts, a running forward stops at its next layer."""
        if not self._cancel.is_set():
            self._stop()
            if not self._finished:
                self.count_cancel()

    def _stop(self) -> None:
        with self._lock:
            self._cancel.set()
            if self._job is not None:
                self._job.cancel.set()

    def count_cancel(self) -> None:
        """Count this flow as cancelled by its caller (once)."""
        if not self._cancel_counted:
            self._cancel_counted = True
            self._engine.runner.counters.cancelled += 1

    async def tokens(self) -> AsyncGenerator[DraftToken, None]:
        """The drafts, in order, until the flow ends; closing the generator closes the flow."""
        try:
            while True:
                item = await self._queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    # -- worker side -------------------------------------------------------------------------------

    def _deliver(self, item: DraftToken | BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is already closed (shutdown)
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _finish(self, item: BaseException | None) -> None:
        with self._lock:
            first, self._finished = not self._finished, True
        if first:
            self._deliver(item)

    def _submit(self) -> None:
        step = functools.partial(
            self._engine._step,
            session_id=self._session_id,
            seq=list(self._seq),
            s=self._sampling,
            return_probs=self._return_probs,
            vocab_limit=self._vocab_limit,
        )
        with self._lock:
            # Its own cancel event: a preempted step stops without stopping the flow.
            self._job = Job(priority=self._priority())
            if self._cancel.is_set():
                self._job.cancel.set()
            job = self._job
        try:
            self._engine.runner.submit(job, step, self._stepped)
        except RuntimeError as exc:  # the runner is shutting down
            self._finish(exc)

    def _stepped(self, fut: Future[DraftToken]) -> None:
        if fut.cancelled():  # the runner shut down with this step queued
            self._finish(RuntimeError("the model runner is shutting down"))
            return
        exc = fut.exception()
        if exc is not None:
            if not isinstance(exc, ForwardCancelled):
                self._finish(exc)
            elif self._job is not None and self._job.preempted and not self._cancel.is_set():
                self._submit()  # an urgent step of another flow took the model: queue this one again
            return
        token = fut.result()
        with self._lock:
            self._seq.append(token.token_id)
            self._credit -= 1
            # Queued before `running` drops, so an end marker from end_grants() can only follow it.
            self._deliver(token)
            more = self._credit > 0 and not self._cancel.is_set()
            self._running = more
            end = not more and self._grants_ended and self._credit == 0
        if more:
            self._submit()
        elif end:
            self._finish(None)


class DrafterEngine:
    def __init__(self, runner: ModelRunner, oracle_acceptance: float = 0.0) -> None:
        self.runner = runner
        self.oracle_acceptance = oracle_acceptance

    def _step(
        self, job: Job, session_id: str, seq: list[int], s: Sampling, return_probs: bool, vocab_limit: int = 0
    ) -> DraftToken:
        logits, _ = self.runner.forward(job, session_id, seq, len(seq) - 1)  # [1, vocab]
        if 0 < vocab_limit < logits.shape[-1]:
            # Only the ids the target shares (its embedding may be smaller than ours). The coupled
            # noise is a hash of each token id, so the slice keeps it aligned with the target's.
            logits = logits[:, :vocab_limit]  # [1, vocab_limit]
        position = len(seq)
        if self.oracle_acceptance > 0:
            top2 = torch.topk(logits[0], 2).indices.tolist()
            u = float(uniform_noise(s.seed, position, 1, _SALT_ORACLE)[0])
            return DraftToken(top2[0] if u < self.oracle_acceptance else top2[1], position)
        if return_probs and not s.greedy:
            token, q = draft_sample(logits[0], position, s)
            return DraftToken(token, position, sparse_from_dense(q))
        return DraftToken(coupled_choice(logits, [position], s)[0], position)

    def flow(
        self,
        session_id: str,
        token_ids: list[int],
        credit: int,
        sampling: Sampling,
        return_probs: bool,
        vocab_limit: int = 0,
        order: int = 0,
    ) -> DraftFlow:
        """A flow of drafts continuing token_ids, ``credit`` of them before the next grant; every
        draft is an id below ``vocab_limit`` (0 = any id of the model). Among the steps of several
        flows waiting for the model, urgent ones go first, then the lowest ``order``."""
        return DraftFlow(self, session_id, token_ids, credit, sampling, return_probs, vocab_limit, order)

    async def draft(
        self,
        session_id: str,
        token_ids: list[int],
        max_tokens: int,
        sampling: Sampling,
        return_probs: bool,
        vocab_limit: int = 0,
    ) -> AsyncGenerator[DraftToken, None]:
        """Yield up to max_tokens drafts continuing token_ids; stops before the next token on cancel."""
        flow = self.flow(session_id, token_ids, max_tokens, sampling, return_probs, vocab_limit)
        flow.end_grants()
        async with contextlib.aclosing(flow.tokens()) as tokens:
            async for token in tokens:
                yield token

    async def release(self, session_id: str) -> bool:
        return await self.runner.release(session_id)
