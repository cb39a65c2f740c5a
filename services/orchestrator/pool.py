"""The target pool as the scheduler uses it: verify a window on some instance, retrying elsewhere
when one fails. Built from ``targets.py`` (membership and health) and ``placement.py`` (which
window gets which instance: rank, preemption, affinity).

Incremental Verify: a window sends only what the chosen instance does not already hold of the
session (the rest referenced by length and prefix hash, from the placement's records). A stale
reference (evicted, restarted, cut back by a cancel) fails with FAILED_PRECONDITION and is sent
again in full. A call that fails with UNAVAILABLE or DEADLINE_EXCEEDED marks the instance down (its
other windows go elsewhere at once); RESOURCE_EXHAUSTED (device memory, the target's call limit)
is an overload: the window goes elsewhere and the instance stays."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc

from dsi.services.orchestrator import policy
from dsi.services.orchestrator.metrics import OrchestratorMetrics
from dsi.services.orchestrator.placement import COLD_TOKENS, PREFILL_BUDGET, Preempted, Running, held_prefix
from dsi.services.orchestrator.placement import Placement as Placement
from dsi.services.orchestrator.scheduler import WindowRequest, WindowResult, Yielded
from dsi.services.orchestrator.targets import CHANNEL_OPTIONS as CHANNEL_OPTIONS
from dsi.services.orchestrator.targets import Held as Held
from dsi.services.orchestrator.targets import TargetInstance, Targets, TargetSnapshot
from dsi.services.orchestrator.targets import model_mismatch as model_mismatch
from dsi.services.orchestrator.tuning import Estimates
from dsi.services.runtime import tls
from dsi.services.runtime.errors import Unavailable as Unavailable
from dsi.services.runtime.params import Sampling
from dsi.services.runtime.prefixes import extend
from dsi.services.runtime.validation import sampling_to_pb
from dsi.v1 import common_pb2, target_pb2

log = logging.getLogger(__name__)

RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,  # the server cancelled it (shutting down); our own cancels never get here
}


class InstanceDown(Exception):
    """The instance running a window was marked down (e.g. hung: health checks time out)."""


class TargetPool:
    def __init__(
        self,
        addresses: list[str],
        deadline_s: float = 60.0,
        health_interval_s: float = 1.0,
        max_retries: int = 2,
        metrics: OrchestratorMetrics | None = None,
        incremental: bool = True,
        cold_tokens: int = COLD_TOKENS,
        headroom: int = 1,
        prefill_budget: float = PREFILL_BUDGET,
        upstream_tls: tls.ClientTLS | None = None,
    ) -> None:
        self.deadline_s = deadline_s
        # Windows send only what the instance does not hold (False: always the whole sequence).
        self.incremental = incremental
        self.max_retries = max_retries
        self.metrics = metrics
        self.targets = Targets(addresses, health_interval_s, metrics, upstream_tls)
        self.placement = Placement(self.targets, cold_tokens, headroom, metrics, prefill_budget)
        # Session id -> addresses of the instances that were sent any of its windows (for Release).
        self._sent: dict[str, set[str]] = {}
        # Where decode windows' latencies go (automatic lookahead), when set.
        self.estimates: Estimates | None = None

    # -- membership and health (``Targets``) ------------------------------------------------------

    def set_addresses(self, addresses: list[str]) -> None:
        self.targets.set_addresses(addresses)

    @property
    def addresses(self) -> list[str]:
        return self.targets.addresses

    @property
    def on_change(self) -> Any:
        return self.targets.on_change

    @on_change.setter
    def on_change(self, callback: Any) -> None:
        self.targets.on_change = callback

    def healthy_count(self) -> int:
        return self.targets.healthy_count()

    def sp_limit(self) -> int:
        return self.targets.healthy_count()

    def snapshot(self) -> list[TargetSnapshot]:
        return self.targets.snapshot()

    def require_model(self, model: common_pb2.ModelInfo) -> None:
        self.targets.require_model(model)

    def unavailable_message(self) -> str:
        return self.targets.unavailable_message()

    async def start(self) -> None:
        await self.targets.start()

    async def close(self) -> None:
        await self.targets.close()

    async def wait_healthy(self, timeout_s: float, count: int = 1) -> bool:
        return await self.targets.wait_healthy(timeout_s, count)

    async def check_health(self) -> None:
        await self.targets.check_health()

    # -- placement (``Placement``) ----------------------------------------------------------------

    def spare(self, session_id: str | None = None) -> int:
        return self.placement.spare(session_id)

    def load(self, session_id: str) -> policy.Load:
        return self.placement.load(session_id)

    def reprioritize(self, request: WindowRequest, rank: int) -> None:
        self.placement.reprioritize(request, rank)

    def ended(self, session_id: str) -> None:
        """The session's request is over: no longer under way for the others (``release_session``
        drops its records later)."""
        self.placement.ended(session_id)

    # -- verifying a window ----------------------------------------------------------------------

    async def verify(
        self,
        window: WindowRequest,
        sampling: common_pb2.SamplingParams,
        request_id: str,
        chunking: tuple[int, int] | None = None,
    ) -> WindowResult:
        # Everything but the sequence, which depends on what the chosen instance holds.
        request = target_pb2.VerifyRequest(
            request_id=request_id,
            session_id=window.session_id,
            first_position=window.first_position,
            sampling=sampling,
        )
        if chunking is not None:
            request.chunk_origin, request.chunk_size = chunking
        for ids, probs in window.draft_probs or []:
            request.draft_probs.add(token_ids=ids, probs=probs)
        self.placement.track(window)
        try:
            return await self._verify(window, request, request_id)
        finally:
            self.placement.untrack(window)

    def _prefix_hash(self, window: WindowRequest, k: int) -> int:
        """The hash of the window's first k tokens: the committed prefix's is kept, the rest (a few
        drafts at most) hashed now."""
        hashes = self.placement.committed[window.session_id]
        if k <= window.committed:
            return hashes.at(k)
        return extend(hashes.at(window.committed), window.token_ids[window.committed : k])

    def _sequence(
        self, request: target_pb2.VerifyRequest, window: WindowRequest, inst: TargetInstance, full: bool
    ) -> int:
        """Put into the request the part of the window's sequence the instance does not hold; returns
        how many leading tokens it references instead (prefix_length)."""
        k = 0 if full or not self.incremental else min(held_prefix(inst, window), window.first_position)
        del request.token_ids[:]
        request.token_ids.extend(window.token_ids[k:] if k else window.token_ids)
        request.prefix_length = k
        request.prefix_hash = self._prefix_hash(window, k) if k else 0
        return k

    async def _verify(self, window: WindowRequest, request: target_pb2.VerifyRequest, request_id: str) -> WindowResult:
        retries = 0
        full = False  # the instance did not hold a prefix it was sent by reference: send everything
        loop = asyncio.get_running_loop()
        while True:
            asked = time.perf_counter()
            try:
                inst = await self.placement.acquire(window)
            finally:
                window.timing.queued_s += time.perf_counter() - asked
            window.timing.acquired += 1
            # Sent, so the instance may hold the session from now on, whatever the call's outcome.
            self._sent.setdefault(window.session_id, set()).add(inst.address)
            started = time.perf_counter()
            inst.running = Running(window, self.placement.rank(window), started, loop.create_future())
            to_compute = len(window.token_ids) - held_prefix(inst, window)
            referenced = self._sequence(request, window, inst, full)
            call = inst.stub.Verify(request, timeout=self.deadline_s)
            answered = False
            try:
                response = await self._answer_unless_down(call, inst, inst.running.preempt)
                answered = True
            except asyncio.CancelledError:
                call.cancel()  # a real cancel: the target stops its forward pass
                raise
            except Preempted as exc:
                call.cancel()
                window.timing.preempted += 1
                if window.yields:
                    raise Yielded(str(exc)) from exc  # dropped; the instance goes to the critical window
                continue  # back to the queue with its rank; the instance goes to the critical window
            except (grpc.aio.AioRpcError, InstanceDown) as exc:
                if isinstance(exc, grpc.aio.AioRpcError):
                    if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and referenced:
                        # Its cache no longer holds what the pool recorded: send the whole sequence.
                        inst.sessions.pop(window.session_id, None)
                        window.timing.acquired -= 1  # refused before any forward
                        full = True
                        if self.metrics is not None:
                            self.metrics.prefix_misses.inc()
                        continue
                    if exc.code() not in RETRYABLE:
                        raise
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        self.targets.mark_down(inst, f"{exc.code().name}: {exc.details()}")
                    # RESOURCE_EXHAUSTED (device memory, or the target's call limit) is an overload:
                    # the instance stays in the pool and the window tries another one.
                reason = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "marked down"
                retries += 1
                window.timing.retries += 1
                if self.metrics is not None:
                    self.metrics.retries.inc()
                if retries > self.max_retries:
                    raise Unavailable(f"window failed {retries} times; {self.targets.unavailable_message()}") from exc
                log.warning("request %s: retrying window on another target (%s)", request_id, reason)
                continue
            finally:
                inst.running = None
                if answered:
                    # Recorded before the instance is released: the windows waiting for an instance
                    # warm for this session are handed it with it known to hold the session.
                    self.placement.verified(inst, window)
                else:
                    self.placement.unsure(inst, window, request.chunk_size > 0)
                elapsed = time.perf_counter() - started
                window.timing.held_s += elapsed
                inst.busy_s += elapsed
                if self.metrics is not None:
                    self.metrics.target_busy.labels(inst.address).inc(elapsed)
                self.placement.release(inst)
            if self.estimates is not None:
                self.estimates.window(time.perf_counter() - started, to_compute)
            return WindowResult(list(response.token_ids), inst.address, response.compute_s, retries)

    @staticmethod
    async def _answer_unless_down(
        call: Any, inst: TargetInstance, preempt: asyncio.Future[None]
    ) -> target_pb2.VerifyResponse:
        """The call's answer, or InstanceDown as soon as the instance is marked down (a hung target
        answers nothing until the deadline; its window is re-sent elsewhere at once instead), or
        Preempted when a critical window needs the instance (the call is cancelled)."""
        down = inst.down_signal()
        answer: asyncio.Future[target_pb2.VerifyResponse] = asyncio.ensure_future(call)  # a grpc call, not a coroutine
        try:
            await asyncio.wait([answer, down, preempt], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
        except asyncio.CancelledError:
            answer.cancel()  # cancels the RPC too
            raise
        if answer.done():
            return answer.result()
        answer.cancel()
        if preempt.done():
            raise Preempted(f"{inst.address} preempted for a critical window")
        raise InstanceDown(f"{inst.address} was marked down")

    async def release_session(self, session_id: str) -> None:
        """Drop the session on every instance that was ever sent one of its windows (the target
        creates it before the forward, so a window cancelled or failed there leaves one too)."""
        sent = self._sent.pop(session_id, set())
        holders = self.placement.forget(session_id)
        holders += [i for i in self.targets.all() if i.address in sent and i not in holders]
        await asyncio.gather(
            *(i.stub.Release(target_pb2.TargetReleaseRequest(session_id=session_id), timeout=5.0) for i in holders),
            return_exceptions=True,
        )


class PoolTargetClient:
    """The scheduler's TargetClient for one request."""

    def __init__(
        self,
        pool: TargetPool,
        sampling: Sampling,
        request_id: str,
        chunking: tuple[int, int] | None = None,
    ) -> None:
        self.pool = pool
        self.sampling = sampling_to_pb(sampling)
        self.request_id = request_id
        # (chunk_origin, chunk_size) of fixed-shape target forwards (--reproducible); None = off.
        self.chunking = chunking

    def sp_limit(self) -> int:
        return self.pool.sp_limit()

    def load(self) -> policy.Load:
        return self.pool.load(self.request_id)

    def reprioritize(self, window: WindowRequest, rank: int) -> None:
        self.pool.reprioritize(window, rank)

    def end(self) -> None:
        self.pool.ended(self.request_id)

    async def verify(self, window: WindowRequest) -> WindowResult:
        return await self.pool.verify(window, self.sampling, self.request_id, self.chunking)
