"""``Orchestrator.generate`` in-process against the unit tests' fakes (a fake pool over
``tests.unit.fakes.FakeTarget``, ``FakeDrafter``, a scripted tokenizer): a slow tokenization runs off
the event loop, so other requests keep streaming meanwhile; and a consumer's cancel reaches the
caller and stops the scheduler's run, which is cancelled and awaited before the cancel completes."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Sequence

import pytest

from dsi.services.orchestrator import policy
from dsi.services.orchestrator.metrics import OrchestratorMetrics
from dsi.services.orchestrator.scheduler import WindowRequest, WindowResult
from dsi.services.orchestrator.service import Chunk, Orchestrator
from dsi.services.runtime.params import Sampling
from dsi.services.runtime.validation import GenerateLimits, GenerateParams, validate_generate
from dsi.v1 import orchestrator_pb2
from tests.unit.fakes import VOCAB, FakeDrafter, FakeTarget, reference

pytestmark = pytest.mark.unit

LIMITS = GenerateLimits(vocab_size=VOCAB, max_new_tokens=500, max_prompt_tokens=1000, max_lookahead=8,
                        default_lookahead=3)


class ScriptedTokenizer:
    """One token per character (id = code point mod VOCAB). Encoding a prompt that starts with 'slow'
    takes ``encode_s`` seconds of blocking work (``time.sleep``: a long prompt in a real tokenizer),
    and records when it ran."""

    eos_token_id = None

    def __init__(self, encode_s: float = 2.0) -> None:
        self.encode_s = encode_s
        self.slow_started = threading.Event()
        self.slow_span: tuple[float, float] | None = None

    def encode(self, text: str) -> list[int]:
        if text.startswith("slow"):
            t0 = time.monotonic()
            self.slow_started.set()
            time.sleep(self.encode_s)
            self.slow_span = (t0, time.monotonic())
        return [ord(c) % VOCAB for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)

    def __len__(self) -> int:
        return VOCAB


class FakePool:
    """What the orchestrator uses of a ``TargetPool``, over a ``FakeTarget``; records releases."""

    def __init__(self, target: FakeTarget) -> None:
        self.target = target
        self.addresses: list[str] = []
        self.released: list[str] = []
        self.ended_sessions: list[str] = []

    def sp_limit(self) -> int:
        return self.target.sp_limit()

    def spare(self, session_id: str | None = None) -> int:
        return self.target.spare()

    def load(self, session_id: str) -> policy.Load:
        return self.target.load()

    def reprioritize(self, window: WindowRequest, rank: int) -> None:
        self.target.reprioritize(window, rank)

    def ended(self, session_id: str) -> None:
        self.ended_sessions.append(session_id)

    async def verify(self, window: WindowRequest, sampling: object, request_id: str,
                     chunking: tuple[int, int] | None = None) -> WindowResult:
        return await self.target.verify(window)

    async def release_session(self, session_id: str) -> None:
        self.released.append(session_id)


class FakeDrafterService:
    """What the orchestrator uses of ``drafter_client.Drafter``, over a ``FakeDrafter``."""

    def __init__(self, drafter: FakeDrafter) -> None:
        self.drafter = drafter
        self.released: list[str] = []

    def client(self, sampling: Sampling, request_id: str, order: int) -> FakeDrafter:
        return self.drafter

    async def release(self, session_id: str) -> None:
        self.released.append(session_id)


def _orchestrator(target: FakeTarget, tokenizer: ScriptedTokenizer | None = None,
                  drafter: FakeDrafter | None = None) -> tuple[Orchestrator, FakePool, OrchestratorMetrics]:
    pool, metrics = FakePool(target), OrchestratorMetrics()
    orch = Orchestrator(pool, FakeDrafterService(drafter) if drafter is not None else None,  # type: ignore[arg-type]
                        tokenizer or ScriptedTokenizer(), LIMITS, [], metrics)
    return orch, pool, metrics


def _params(**fields: object) -> GenerateParams:
    return validate_generate(orchestrator_pb2.GenerateRequest(ignore_eos=True, **fields), LIMITS)  # type: ignore[arg-type]


async def _collect(orch: Orchestrator, params: GenerateParams) -> list[int]:
    ids: list[int] = []
    async for chunk in orch.generate(params):
        ids.extend(t.token_id for t in chunk.tokens)
    return ids


def test_a_slow_tokenization_does_not_stall_other_requests() -> None:
    """Request A's prompt takes 2 s to encode (blocking work). Meanwhile request B streams all its 20
    tokens, and the event loop never stalls for more than 0.5 s: tokenization runs off the loop.
    Tokenizing on the loop (as before) would hold B, and every other call, for the whole 2 s."""
    tokenizer = ScriptedTokenizer(encode_s=2.0)
    orch, _, _ = _orchestrator(FakeTarget(instances=3, latency=0.01), tokenizer)
    nonsi = orchestrator_pb2.MODE_NONSI

    async def main() -> None:
        ticks: list[float] = []
        stop = asyncio.Event()

        async def heartbeat() -> None:  # the loop's responsiveness, every 10 ms
            while not stop.is_set():
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        beat = asyncio.create_task(heartbeat())
        slow = asyncio.create_task(_collect(orch, _params(prompt="slow prompt", max_new_tokens=4, mode=nonsi)))
        deadline = time.monotonic() + 5.0
        while not tokenizer.slow_started.is_set():
            assert time.monotonic() < deadline, "the slow tokenization never started"
            await asyncio.sleep(0.005)
        fast_prompt = "fast prompt"
        fast = await _collect(orch, _params(prompt=fast_prompt, max_new_tokens=20, mode=nonsi))
        fast_done = time.monotonic()
        assert tokenizer.slow_span is None, "request B waited for request A's tokenization"
        slow_ids = await slow
        stop.set()
        await beat
        await orch.close()

        assert tokenizer.slow_span is not None
        t0, t1 = tokenizer.slow_span
        assert t1 - t0 >= 2.0 and fast_done < t1  # B finished while A's prompt was still being encoded
        assert fast == reference(tokenizer.encode(fast_prompt), 20)
        assert slow_ids == reference([ord(c) % VOCAB for c in "slow prompt"], 4)
        during = [t for t in ticks if t0 <= t <= t1]
        gaps = [b - a for a, b in zip(during, during[1:], strict=False)]
        assert len(during) > 20 and max(gaps) < 0.5, f"event loop stalled {max(gaps, default=0):.2f} s"

    asyncio.run(main())


class _CancelsOnWindDown(FakeTarget):
    """The first window cancelled on this target (a rejection closing an epoch with windows in flight)
    cancels ``consumer`` too, so the request's cancel lands while the scheduler waits for its
    cancelled windows to wind down (each takes 50 ms: the remote cancel's round trip)."""

    consumer: asyncio.Task[object] | None = None
    triggered_at: float | None = None

    async def verify(self, window: WindowRequest) -> WindowResult:
        try:
            return await super().verify(window)
        except asyncio.CancelledError:
            if self.consumer is not None and self.triggered_at is None:
                self.triggered_at = time.monotonic()
                self.consumer.cancel()
            await asyncio.sleep(0.05)
            raise


def _scheduler_runs() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "Scheduler.run"]  # type: ignore[union-attr]


def test_cancelling_the_consumer_cancels_and_awaits_the_scheduler_run() -> None:
    """A DSI request (200 tokens) whose consumer is cancelled at an epoch boundary, while the
    scheduler waits for its cancelled windows: the CancelledError reaches the consumer within 0.5 s;
    by then the scheduler's run task is cancelled and done (awaited, not left running); afterwards no
    window is started and none computes; the request's sessions are released on the pool and the
    drafter; the metrics count it as cancelled."""
    target = _CancelsOnWindDown(instances=4, latency=0.05)
    drafter = FakeDrafter(latency=0.005, acceptance=0.5)
    orch, pool, metrics = _orchestrator(target, drafter=drafter)
    params = _params(prompt_token_ids=[1, 2, 3], max_new_tokens=200, lookahead=3, request_id="req-1")

    async def main() -> None:
        chunks: list[Chunk] = []
        runs: list[asyncio.Task[object]] = []

        async def consume() -> None:
            async for chunk in orch.generate(params):
                chunks.append(chunk)
                if not runs:
                    runs.extend(_scheduler_runs())

        consumer = asyncio.create_task(consume())
        target.consumer = consumer  # type: ignore[assignment]
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(consumer), 20.0)
        cancelled_at = time.monotonic()
        assert consumer.cancelled()
        assert target.triggered_at is not None
        assert cancelled_at - target.triggered_at < 0.5, "the cancel waited for the request to run on"
        (run,) = runs
        assert run.done() and run.cancelled()  # the run was cancelled and awaited before the cancel came out
        committed = sum(len(c.tokens) for c in chunks)
        assert 0 < committed < 200 and chunks[-1].stats is None  # stopped mid-way, no final chunk
        calls = len(target.calls)
        await asyncio.sleep(0.5)
        assert len(target.calls) == calls, "windows were started after the cancel"
        assert target.spare() == target.instances  # nothing computes or waits for the request
        await orch.close()
        assert pool.released == ["req-1"]
        assert orch.drafter is not None and orch.drafter.released == ["req-1"]  # type: ignore[attr-defined]
        assert metrics.registry.get_sample_value("dsi_requests_total", {"mode": "dsi", "outcome": "cancelled"}) == 1

    asyncio.run(main())


def test_a_cancel_while_a_closed_request_winds_down_is_not_swallowed() -> None:
    """The consumer stops reading and closes the stream (as the servicer's ``aclosing`` does when a
    client goes away): the close waits while the request's scheduler run winds down, and a cancel of
    the consumer arriving meanwhile is not swallowed (the code after its ``async with`` never runs);
    the run stops within 0.5 s and starts no window afterwards."""
    target = _CancelsOnWindDown(instances=4, latency=0.05)
    drafter = FakeDrafter(latency=0.005, acceptance=0.5)
    orch, pool, _ = _orchestrator(target, drafter=drafter)
    params = _params(prompt_token_ids=[1, 2, 3], max_new_tokens=200, lookahead=3, request_id="req-2")

    async def main() -> None:
        after_close: list[bool] = []
        runs: list[asyncio.Task[object]] = []

        async def consume() -> None:
            async with contextlib.aclosing(orch.generate(params)) as chunks:
                async for _ in chunks:
                    runs.extend(_scheduler_runs())
                    # From now on the first window cancelled (closing the request) cancels this task.
                    target.consumer = asyncio.current_task()  # type: ignore[assignment]
                    break
            after_close.append(True)

        consumer = asyncio.create_task(consume())
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(consumer), 20.0)
        assert consumer.cancelled() and not after_close
        (run,) = runs
        deadline = time.monotonic() + 0.5
        while not run.done():
            assert time.monotonic() < deadline, "the scheduler's run went on after the request was closed"
            await asyncio.sleep(0.01)
        calls = len(target.calls)
        await asyncio.sleep(0.5)
        assert len(target.calls) == calls
        await orch.close()
        assert pool.released == ["req-2"]

    asyncio.run(main())
