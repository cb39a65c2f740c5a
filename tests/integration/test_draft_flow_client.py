"""The orchestrator's drafter client against a real DrafterService (in-process gRPC): one DraftFlow
stream per epoch, a stream that outlives the per-call deadline is replaced (not treated as a dead
drafter), no task is left behind, and an idle flow's cancel is counted on the drafter."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from dsi.services.drafter.engine import DrafterEngine
from dsi.services.drafter.servicer import DrafterServicer
from dsi.services.model.emulation import Emulation
from dsi.services.model.loading import load_causal_lm
from dsi.services.model.runner import ModelRunner
from dsi.services.model.sampling import Sampling
from dsi.services.model.worker import BACKGROUND
from dsi.services.orchestrator import policy
from dsi.services.orchestrator.drafter_client import GrpcDrafterClient
from dsi.services.orchestrator.scheduler import Scheduler, SchedulerConfig, WindowRequest, WindowResult
from dsi.v1 import common_pb2, drafter_pb2, drafter_pb2_grpc

pytestmark = pytest.mark.integration

PROMPT = [5, 6, 7, 8]


class AcceptAllTarget:
    """A target whose tokens are the drafter's own greedy continuation: every draft is accepted."""

    def __init__(self, seq: list[int], latency: float, spare: int = 2) -> None:
        self.seq = seq
        self.latency = latency
        self._spare = spare

    def sp_limit(self) -> int:
        return 2

    def load(self) -> policy.Load:
        return policy.Load(self._spare)

    def end(self) -> None:
        pass

    def reprioritize(self, window: WindowRequest, rank: int) -> None:
        pass

    async def verify(self, window: WindowRequest) -> WindowResult:
        await asyncio.sleep(self.latency)
        tokens = [self.seq[j] for j in range(window.first_position, len(window.token_ids) + 1)]
        return WindowResult(tokens, "fake", self.latency)


@contextlib.asynccontextmanager
async def _serve(
    engine: DrafterEngine, deadline_s: float = 30.0
) -> AsyncIterator[tuple[drafter_pb2_grpc.DrafterServiceStub, GrpcDrafterClient]]:
    """A DrafterService on a free port; yields its stub and the orchestrator's client for it."""
    server = grpc.aio.server()
    drafter_pb2_grpc.add_DrafterServiceServicer_to_server(DrafterServicer(engine, 1024), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = drafter_pb2_grpc.DrafterServiceStub(channel)
            yield stub, GrpcDrafterClient(stub, common_pb2.SamplingParams(), "r", deadline_s)
    finally:
        await server.stop(None)


def _engine(drafter_dir: Path, decode_ms: float = 0.0, background_limit: float = 1.0) -> DrafterEngine:
    loaded = load_causal_lm(str(drafter_dir), "cpu", "float32", 1)
    return DrafterEngine(ModelRunner(loaded, emulation=Emulation(0.0, decode_ms / 1000),
                                     background_limit=background_limit))


def test_epoch_longer_than_the_deadline_keeps_the_drafter(tiny_pair: tuple[Path, Path]) -> None:
    engine = _engine(tiny_pair[1], decode_ms=10)
    n = 40

    async def scenario() -> None:
        reference = PROMPT + [t.token_id async for t in engine.draft("ref", PROMPT, n + 4, Sampling(), False)]
        async with _serve(engine, deadline_s=1.0) as (_, client):
            sched = Scheduler(AcceptAllTarget(reference, 0.3), client,
                              SchedulerConfig(mode="dsi", lookahead=3, max_new_tokens=n), "s")
            out: list[int] = []
            t0 = asyncio.get_running_loop().time()
            stats = await sched.run(PROMPT, lambda t: out.append(t.token_id) or False)
            elapsed = asyncio.get_running_loop().time() - t0
            assert out == reference[len(PROMPT): len(PROMPT) + n]
            assert elapsed > 1.5  # the epoch outlived the 1 s deadline
            assert not stats.drafter_failed
            assert stats.epochs == 1  # every draft accepted: no rejection ever ended the epoch
            assert stats.tokens_from_drafts >= n - 3
            await asyncio.sleep(0.2)
            # No request generator, reader or stream left behind (the in-process server's own
            # task waiting for the next call is not ours).
            leftover = [t for t in asyncio.all_tasks()
                        if t is not asyncio.current_task() and "AioServer" not in repr(t)]
            assert not leftover, leftover

    try:
        asyncio.run(scenario())
    finally:
        engine.runner.close()


def test_cancel_of_an_idle_flow_is_counted(tiny_pair: tuple[Path, Path]) -> None:
    engine = _engine(tiny_pair[1])

    async def scenario() -> None:
        async with _serve(engine) as (stub, client):
            stream = client.open("s", PROMPT, 2, False)
            drafts = stream.__aiter__()
            for _ in range(2):
                await anext(drafts)
            await asyncio.sleep(0.2)  # the credit is used up: the flow idles, waiting for a grant
            assert engine.runner.counters.cancelled == 0
            stream.cancel()
            await asyncio.sleep(0.3)
            assert engine.runner.counters.cancelled == 1
            assert engine.runner.counters.forwards_completed == 2

    try:
        asyncio.run(scenario())
    finally:
        engine.runner.close()


def test_half_close_ends_the_flow_after_its_credit(tiny_pair: tuple[Path, Path]) -> None:
    engine = _engine(tiny_pair[1])

    async def scenario() -> None:
        async with _serve(engine) as (stub, client):
            stream = client.open("s", PROMPT, 3, False)
            stream.grant(2)
            stream.end_grants()
            got = [d.token_id async for d in stream]
            assert len(got) == 5
            assert await stream.call.code() == grpc.StatusCode.OK
            assert engine.runner.counters.cancelled == 0
            info = await stub.Info(drafter_pb2.DrafterInfoRequest())
            assert info.counters.calls == 1

    try:
        asyncio.run(scenario())
    finally:
        engine.runner.close()


@pytest.mark.parametrize(("mode", "spare"), [("si", 2), ("dsi", 2), ("dsi", 0)])
def test_a_hung_drafter_is_abandoned_after_a_bounded_wait(tiny_pair: tuple[Path, Path], mode: str, spare: int) -> None:
    """A drafter that sends nothing while it has credit (here: 30 s per draft): SI gives it up after
    the stall time and finishes target-only, saying so; DSI with idle targets does not wait for
    drafts (its zero-draft window runs at once), and DSI under load (no spare target: no window 0)
    gives the drafter up after the stall time and goes on with what there is."""
    engine = _engine(tiny_pair[1], decode_ms=30_000)
    n = 6

    async def scenario() -> None:
        reference = PROMPT + [1] * (n + 1)
        async with _serve(engine, deadline_s=60.0) as (stub, client):
            client.stall_s = 0.5
            sched = Scheduler(AcceptAllTarget(reference, 0.01, spare), client,
                              SchedulerConfig(mode=mode, lookahead=3, max_new_tokens=n), "s")
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            out: list[int] = []
            stats = await asyncio.wait_for(sched.run(PROMPT, lambda t: out.append(t.token_id) or False), 20)
            assert out == reference[len(PROMPT):len(PROMPT) + n]
            assert loop.time() - t0 < 5.0  # at most one stall, not one per round, nor the 60 s deadline
            if mode == "si" or spare == 0:
                assert stats.drafter_failed
            await asyncio.sleep(0.3)
            assert engine.runner.counters.cancelled >= 1  # the hung stream was really cancelled

    try:
        asyncio.run(scenario())
    finally:
        engine.runner.close()


def test_urgent_drafts_of_every_stream_go_before_background_ones(tiny_pair: tuple[Path, Path]) -> None:
    """Speculation yields on the drafter too: a stream whose drafts are marked background gets the
    model only while no other stream has an urgent draft to make (its running step is preempted,
    and made again later: its drafts are unchanged); a background draft that becomes urgent takes
    its place at once; among urgent streams the older request (lower order) goes first."""
    engine = _engine(tiny_pair[1], decode_ms=50)

    async def scenario() -> None:
        reference = [t.token_id async for t in engine.draft("ref", PROMPT, 6, Sampling(), False)]
        async with _serve(engine) as (stub, _):
            arrivals: list[str] = []
            tokens: dict[str, list[int]] = {"bg": [], "new": [], "old": []}

            def client(order: int) -> GrpcDrafterClient:
                return GrpcDrafterClient(stub, common_pb2.SamplingParams(), f"r{order}", 30.0, order=order)

            async def read(name: str, stream: object, n: int) -> None:
                drafts = stream.__aiter__()  # type: ignore[attr-defined]
                for _ in range(n):
                    tokens[name].append((await anext(drafts)).token_id)
                    arrivals.append(name)

            background = client(0).open("bg", PROMPT, 6, False)
            background.set_urgent(len(PROMPT))  # none of its drafts is urgent (yet)
            readers = [asyncio.ensure_future(read("bg", background, 6))]
            # The drafter is busy with a background step (50 ms long) when the urgent streams come.
            for _ in range(5000):
                if arrivals and getattr(engine.runner._job, "priority", (0, 0))[0] == BACKGROUND:
                    break
                await asyncio.sleep(0.001)
            urgent_new = client(2).open("new", PROMPT, 6, False)
            urgent_old = client(1).open("old", PROMPT, 6, False)
            readers += [asyncio.ensure_future(read(n, s, 6)) for n, s in (("new", urgent_new), ("old", urgent_old))]
            await asyncio.wait_for(asyncio.gather(*readers[1:]), 10)
            # Once the urgent streams were drafting, no background draft came before they were done
            # (the background step running when they came was preempted).
            first_urgent = min(i for i, a in enumerate(arrivals) if a != "bg")
            assert "bg" not in arrivals[first_urgent:], arrivals
            arrivals = [a for a in arrivals if a != "bg"]
            assert engine.runner.counters.preempted >= 1
            # The older request's drafts went first: from its first one on, the newer stream (opened
            # first, so it may have started before the older one arrived) waited for all of them.
            first_old = arrivals.index("old")
            assert arrivals[first_old: first_old + 6] == ["old"] * 6, arrivals
            background.set_urgent(0)  # now all of its drafts are urgent: it finishes
            await asyncio.wait_for(readers[0], 10)
            assert tokens["bg"] == tokens["new"] == tokens["old"] == reference
            for s in (background, urgent_new, urgent_old):
                s.cancel()

    try:
        asyncio.run(scenario())
    finally:
        engine.runner.close()


@pytest.mark.parametrize("limit", [0.5, 1.0])
def test_background_drafts_wait_while_urgent_drafts_kept_the_drafter_busy(
    tiny_pair: tuple[Path, Path], limit: float
) -> None:
    """Under load the drafter holds speculation back (``--background-max-load``): with urgent drafts
    keeping it busy it stays idle rather than start a background draft until the urgent share of the
    recent time has fallen below the limit, and Info reports the time held (none without a limit,
    1.0); the drafts are the same either way."""
    engine = _engine(tiny_pair[1], decode_ms=20, background_limit=limit)

    async def scenario() -> None:
        reference = [t.token_id async for t in engine.draft("ref", PROMPT, 4, Sampling(), False)]
        async with _serve(engine) as (stub, _):
            def client(order: int) -> GrpcDrafterClient:
                return GrpcDrafterClient(stub, common_pb2.SamplingParams(), f"r{order}", 30.0, order=order)

            urgent = client(0).open("urgent", PROMPT, 30, False)
            urgent_drafts = urgent.__aiter__()
            got = [(await anext(urgent_drafts)).token_id]  # the drafter is busy with the urgent stream
            background = client(1).open("bg", PROMPT, 4, False)
            background.set_urgent(len(PROMPT))  # none of its drafts is urgent
            got += [t.token_id async for t in urgent_drafts]  # 30 x 20 ms of urgent drafts: load ~0.9
            bg_drafts = background.__aiter__()
            bg = [(await asyncio.wait_for(anext(bg_drafts), 30)).token_id for _ in range(4)]
            info = await stub.Info(drafter_pb2.DrafterInfoRequest())
            if limit < 1.0:
                # About 0.25 s x ln(0.9 / 0.5) = 0.15 s on an idle machine (a free drafter would start
                # it at once); only "some" is asserted: on a loaded machine the urgent share is lower.
                assert info.counters.background_held_s > 0.0, info.counters
            else:
                assert info.counters.background_held_s == 0.0, info.counters
            assert got[:4] == reference and bg == reference
            background.cancel()

    try:
        asyncio.run(scenario())
    finally:
        engine.runner.close()


def test_cancelled_background_steps_do_not_pile_up_behind_urgent_work(tiny_pair: tuple[Path, Path]) -> None:
    """A closed flow's queued background step (every DSI epoch that a rejection ends leaves one)
    leaves the worker's queue at once, even while urgent steps keep the model busy: left at its
    background rank it would wait for the urgent work to stop, and every pick scans the queue."""
    from concurrent.futures import Future

    from dsi.services.model.runner import ForwardCancelled, Job

    engine = _engine(tiny_pair[1], decode_ms=5)
    runner = engine.runner
    urgent_done: list[int] = []
    dead_seen_after: list[int] = []
    chain_over = threading.Event()

    def forward(job: Job) -> None:
        runner.forward(job, "urgent", PROMPT, len(PROMPT) - 1)

    def next_urgent(fut: Future[None]) -> None:
        urgent_done.append(1)
        if len(urgent_done) < 40:
            runner.submit(Job(), forward, next_urgent)
        else:
            chain_over.set()

    def dead_done(fut: Future[None]) -> None:
        assert isinstance(fut.exception(), ForwardCancelled)
        dead_seen_after.append(len(urgent_done))

    try:
        runner.submit(Job(), forward, next_urgent)
        dead = [Job(priority=(BACKGROUND, i)) for i in range(10)]
        for job in dead:
            runner.submit(job, forward, dead_done)
        time.sleep(0.02)
        for job in dead:
            job.cancel.set()
        assert chain_over.wait(10)
        assert len(dead_seen_after) == 10
        assert max(dead_seen_after) <= 5, dead_seen_after  # gone within a few urgent steps, not at the end
        assert runner.counters.cancelled_queued == 10
    finally:
        runner.close()


def test_background_drafts_may_wait_without_the_stream_being_abandoned(tiny_pair: tuple[Path, Path]) -> None:
    """The stall watchdog only watches urgent drafts: a stream whose next draft is background work
    is left waiting however long (under load the drafter makes background drafts only when idle);
    once its next draft is urgent again, a drafter that sends nothing is abandoned as before."""
    from dsi.services.orchestrator.drafter_client import DrafterStalled

    engine = _engine(tiny_pair[1], decode_ms=30_000)  # a hung drafter

    async def scenario() -> None:
        async with _serve(engine, deadline_s=60.0) as (_, client):
            client.stall_s = 0.3
            stream = client.open("s", PROMPT, 3, False)
            drafts = stream.__aiter__()
            await anext(drafts)  # the first one comes at once (a prefill: not padded)
            stream.set_urgent(len(PROMPT) + 1)  # the next draft is background work
            reader = asyncio.ensure_future(anext(drafts))
            await asyncio.sleep(1.0)
            assert not reader.done()  # 3 stall times: still waiting, not abandoned
            stream.set_urgent(0)  # urgent from now on
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(DrafterStalled):
                await asyncio.wait_for(reader, 5)
            assert loop.time() - t0 < 1.0

    try:
        asyncio.run(scenario())
    finally:
        engine.runner.close()
