"""TargetPool scheduling without a network: the critical path first, cache affinity, hand-off."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from dsi.services.orchestrator.metrics import OrchestratorMetrics
from dsi.services.orchestrator.placement import PREFILL_BUDGET
from dsi.services.orchestrator.policy import Load
from dsi.services.orchestrator.pool import Held, TargetPool
from dsi.services.orchestrator.scheduler import RequestStats, WindowRequest, Yielded
from dsi.services.runtime.params import Mode

pytestmark = pytest.mark.unit


def window(session: str, tokens: list[int], rank: int, request_seq: int) -> WindowRequest:
    return WindowRequest(session, tokens, len(tokens), rank, request_seq)


def test_waiting_windows_are_served_critical_path_first_then_first_come() -> None:
    """By rank, then in the order they started waiting (not by request age: policy.queue_key)."""
    async def main() -> list[str]:
        pool = TargetPool(["127.0.0.1:1"], health_interval_s=60)
        inst = pool.targets.get("127.0.0.1:1")
        inst.healthy = True
        holder = await pool.placement.acquire(window("busy", [1], 0, 0))
        order: list[str] = []

        async def wait(name: str, w: WindowRequest) -> None:
            got = await pool.placement.acquire(w)
            order.append(name)
            await asyncio.sleep(0)
            pool.placement.release(got)

        tasks = [
            asyncio.ensure_future(wait("speculative-old", window("a", [1], 2, 0))),
            asyncio.ensure_future(wait("critical-new", window("b", [1], 0, 5))),
            asyncio.ensure_future(wait("critical-old", window("c", [1], 0, 1))),
            asyncio.ensure_future(wait("speculative-new", window("d", [1], 1, 6))),
        ]
        await asyncio.sleep(0.01)
        assert order == []  # all wait for the only instance
        pool.placement.release(holder)
        await asyncio.gather(*tasks)
        await pool.close()
        return order

    assert asyncio.run(main()) == ["critical-new", "critical-old", "speculative-new", "speculative-old"]


def test_free_instance_with_the_longest_cached_prefix_is_preferred() -> None:
    async def main() -> str:
        pool = TargetPool(["127.0.0.1:1", "127.0.0.1:2"], health_interval_s=60)
        for inst in pool.targets.all():
            inst.healthy = True
        pool.targets.get("127.0.0.1:2").sessions["s"] = Held([1, 2, 3, 4], 0, 4)
        pool.targets.get("127.0.0.1:1").sessions["s"] = Held([1, 2], 0, 2)
        got = await pool.placement.acquire(window("s", [1, 2, 3, 4, 5], 0, 0))
        await pool.close()
        return got.address

    assert asyncio.run(main()) == "127.0.0.1:2"


def test_a_cancelled_waiter_does_not_leak_the_instance() -> None:
    async def main() -> bool:
        pool = TargetPool(["127.0.0.1:1"], health_interval_s=60)
        inst = pool.targets.get("127.0.0.1:1")
        inst.healthy = True
        holder = await pool.placement.acquire(window("x", [1], 0, 0))
        waiter = asyncio.ensure_future(pool.placement.acquire(window("y", [1], 1, 1)))
        await asyncio.sleep(0)
        waiter.cancel()
        pool.placement.release(holder)
        await asyncio.sleep(0)
        free_again = not inst.busy
        await pool.close()
        return free_again

    assert asyncio.run(main())


def test_metrics_count_a_request() -> None:
    metrics = OrchestratorMetrics()
    stats = RequestStats(mode=Mode.DSI, windows_dispatched=5, windows_cancelled=2, drafts_verified=8,
                         drafts_accepted=6, new_tokens=10, tokens_from_drafts=6, wall_s=1.0)
    metrics.observe(stats, "ok")
    value = metrics.registry.get_sample_value
    assert value("dsi_windows_cancelled_total", {"mode": "dsi"}) == 2
    assert value("dsi_drafts_accepted_total", {"mode": "dsi"}) == 6
    assert value("dsi_generated_tokens_total", {"mode": "dsi", "source": "target"}) == 4
    assert value("dsi_requests_total", {"mode": "dsi", "outcome": "ok"}) == 1


class _FakeCall:
    """A unary call that answers after ``delay`` seconds; cancel() is what the pool does on a cancel."""

    def __init__(self, delay: float, tokens: list[int]) -> None:
        self.delay, self.tokens, self.cancelled = delay, tokens, False

    def cancel(self) -> None:
        self.cancelled = True

    def __await__(self):  # type: ignore[no-untyped-def]
        async def answer():  # type: ignore[no-untyped-def]
            from dsi.v1 import target_pb2

            await asyncio.sleep(self.delay)
            return target_pb2.VerifyResponse(token_ids=self.tokens)

        return answer().__await__()


class _FakeStub:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.released: list[str] = []

    def Verify(self, request, timeout=None):  # type: ignore[no-untyped-def]  # noqa: N802 - gRPC's name
        return _FakeCall(self.delay, [7])

    async def Release(self, request, timeout=None):  # type: ignore[no-untyped-def]  # noqa: N802
        self.released.append(request.session_id)


def test_a_session_is_released_on_every_instance_that_was_sent_a_window() -> None:
    """The target creates the session before its forward, so an instance that only ever ran a
    cancelled window holds it too and must get a Release."""
    from dsi.v1 import common_pb2

    async def main() -> dict[str, list[str]]:
        pool = TargetPool(["127.0.0.1:1", "127.0.0.1:2"], health_interval_s=60)
        stubs = {"127.0.0.1:1": _FakeStub(delay=10.0), "127.0.0.1:2": _FakeStub(delay=0.0)}
        for address, inst in ((i.address, i) for i in pool.targets.all()):
            inst.healthy = True
            inst.stub = stubs[address]  # type: ignore[assignment]
        sampling = common_pb2.SamplingParams()
        slow = asyncio.ensure_future(pool.verify(window("s", [1, 2], 1, 0), sampling, "r"))
        await asyncio.sleep(0.01)  # the slow window holds instance 1 ...
        await pool.verify(window("s", [1, 2, 3], 0, 0), sampling, "r")  # ... this one runs on 2
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        await pool.release_session("s")
        await pool.release_session("s")  # a second release sends nothing more
        await pool.close()
        return {a: s.released for a, s in stubs.items()}

    assert asyncio.run(main()) == {"127.0.0.1:1": ["s"], "127.0.0.1:2": ["s"]}


def test_a_waiting_window_that_becomes_critical_moves_ahead_of_newer_requests() -> None:
    """A request's queued speculative window becomes its critical path once the windows before it
    are applied; from then on it goes before newer requests' critical windows (no starvation)."""

    async def main() -> list[str]:
        pool = TargetPool(["127.0.0.1:1"], health_interval_s=60)
        pool.targets.get("127.0.0.1:1").healthy = True
        holder = await pool.placement.acquire(window("busy", [1], 0, 0))
        order: list[str] = []
        old_speculative = window("old", [1], 2, 1)

        async def wait(name: str, w: WindowRequest) -> None:
            got = await pool.placement.acquire(w)
            order.append(name)
            await asyncio.sleep(0)
            pool.placement.release(got)

        tasks = [asyncio.ensure_future(wait("old", old_speculative)),
                 asyncio.ensure_future(wait("new-critical", window("new", [1], 0, 7)))]
        await asyncio.sleep(0.01)
        pool.reprioritize(old_speculative, 0)
        pool.reprioritize(old_speculative, 1)  # a higher rank never demotes it again
        pool.placement.release(holder)
        await asyncio.gather(*tasks)
        await pool.close()
        return order

    assert asyncio.run(main()) == ["old", "new-critical"]


class _HungStub(_FakeStub):
    """A target that never answers (SIGSTOPped): its calls wait until cancelled."""

    def __init__(self) -> None:
        super().__init__(delay=3600.0)
        self.calls: list[_FakeCall] = []

    def Verify(self, request, timeout=None):  # type: ignore[no-untyped-def]  # noqa: N802
        call = _FakeCall(self.delay, [7])
        self.calls.append(call)
        return call


def test_a_window_on_an_instance_marked_down_is_resent_at_once() -> None:
    from dsi.v1 import common_pb2

    async def main() -> tuple[list[int], int, float]:
        pool = TargetPool(["127.0.0.1:1", "127.0.0.1:2"], health_interval_s=60)
        hung, good = _HungStub(), _FakeStub(delay=0.0)
        pool.targets.get("127.0.0.1:1").stub = hung  # type: ignore[assignment]
        pool.targets.get("127.0.0.1:2").stub = good  # type: ignore[assignment]
        for inst in pool.targets.all():
            inst.healthy = True
        pool.targets.get("127.0.0.1:2").busy = True  # the window goes to the hung one first
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        task = asyncio.ensure_future(pool.verify(window("s", [1, 2], 0, 0), common_pb2.SamplingParams(), "r"))
        await asyncio.sleep(0.05)
        assert len(hung.calls) == 1 and not task.done()
        pool.targets.get("127.0.0.1:2").busy = False
        pool.targets.mark_down(pool.targets.get("127.0.0.1:1"), "health check timed out")  # what the health loop does
        result = await asyncio.wait_for(task, timeout=5)
        await pool.close()
        return result.token_ids, result.retries, loop.time() - t0

    tokens, retries, elapsed = asyncio.run(main())
    assert tokens == [7] and retries == 1 and elapsed < 5


def test_queue_depth_counts_only_live_waiters() -> None:
    async def main() -> tuple[float, float]:
        metrics = OrchestratorMetrics()
        pool = TargetPool(["127.0.0.1:1"], health_interval_s=60, metrics=metrics)
        pool.targets.get("127.0.0.1:1").healthy = True
        holder = await pool.placement.acquire(window("busy", [1], 0, 0))
        waiters = [asyncio.ensure_future(pool.placement.acquire(window(f"w{i}", [1], 1, i))) for i in range(200)]
        await asyncio.sleep(0)
        for w in waiters[:150]:
            w.cancel()
        await asyncio.gather(*waiters[:150], return_exceptions=True)
        depth = metrics.registry.get_sample_value("dsi_target_queue_depth")
        heap = len(pool.placement._waiters)
        pool.placement.release(holder)
        for w in waiters[150:]:
            pool.placement.release(await w)
        await pool.close()
        return depth, heap

    depth, heap = asyncio.run(main())
    assert depth == 50
    assert heap <= 2 * 50 + 64  # cancelled waiters do not pile up


def test_the_orchestrator_reports_not_serving_while_no_target_is_healthy() -> None:
    from dsi.services.orchestrator.server import _health_follows_targets

    class FakeServer:
        def __init__(self) -> None:
            self.statuses: list[bool] = []

        async def set_status(self, serving: bool) -> None:
            self.statuses.append(serving)

    async def main() -> list[bool]:
        pool = TargetPool(["127.0.0.1:1", "127.0.0.1:2"], health_interval_s=60)
        for inst in pool.targets.all():
            inst.healthy = True
        server = FakeServer()
        pool.on_change = _health_follows_targets(server)  # type: ignore[arg-type]
        pool.targets.mark_down(pool.targets.get("127.0.0.1:1"), "gone")
        await asyncio.sleep(0)
        assert server.statuses == []  # one target left: still serving
        pool.targets.mark_down(pool.targets.get("127.0.0.1:2"), "gone")
        await asyncio.sleep(0)
        pool.targets.get("127.0.0.1:2").healthy = True
        pool.targets._signal()  # what a health check that sees it back does
        await asyncio.sleep(0)
        await pool.close()
        return server.statuses

    assert asyncio.run(main()) == [False, True]


def test_the_health_loop_survives_a_target_removed_while_it_is_checked() -> None:
    """Removing an instance closes its channel, which cancels a health check pending on it; that must
    not end the health loop (every later target would stay down for good)."""

    class HangingHealth:
        """A check that waits until its channel is closed, which cancels the call (not the task)."""

        def __init__(self) -> None:
            self.calls: list[asyncio.Future[None]] = []

        async def Check(self, request, timeout=None):  # type: ignore[no-untyped-def]  # noqa: N802
            call: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.calls.append(call)
            await call

    class ServingHealth:
        async def Check(self, request, timeout=None):  # type: ignore[no-untyped-def]  # noqa: N802
            from grpc_health.v1 import health_pb2

            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def main() -> tuple[bool, bool]:
        pool = TargetPool(["127.0.0.1:1"], health_interval_s=0.05)
        hanging = HangingHealth()
        pool.targets.get("127.0.0.1:1").health = hanging  # type: ignore[assignment]
        pool.targets._health_task = asyncio.ensure_future(pool.targets._health_loop())
        await asyncio.sleep(0.1)
        assert hanging.calls  # a check is pending on the instance
        pool.set_addresses(["127.0.0.1:2"])
        pool.targets.get("127.0.0.1:2").health = ServingHealth()  # type: ignore[assignment]
        for call in hanging.calls:  # the removed instance's channel closes under the pending check
            call.cancel()
        await asyncio.sleep(0.3)
        alive = not pool.targets._health_task.done()
        healthy = pool.targets.get("127.0.0.1:2").healthy
        await pool.close()
        return alive, healthy

    alive, healthy = asyncio.run(main())
    assert alive and healthy


class _SessionStub(_FakeStub):
    """Answers each session's windows after that session's delay; records every call."""

    def __init__(self, delays: dict[str, float]) -> None:
        super().__init__(delay=0.0)
        self.delays = delays
        self.calls: list[tuple[str, _FakeCall]] = []

    def Verify(self, request, timeout=None):  # type: ignore[no-untyped-def]  # noqa: N802
        call = _FakeCall(self.delays[request.session_id], [7])
        self.calls.append((request.session_id, call))
        return call


def _one_instance_pool(stub: _FakeStub) -> TargetPool:
    pool = TargetPool(["127.0.0.1:1"], health_interval_s=60)
    inst = pool.targets.get("127.0.0.1:1")
    inst.healthy = True
    inst.stub = stub  # type: ignore[assignment]
    return pool


def test_a_waiting_critical_window_preempts_a_running_speculative_one() -> None:
    """Speculation yields: the speculative window's forward is cancelled on the target at once, the
    critical window gets the instance, and the speculative one runs again afterwards."""
    from dsi.v1 import common_pb2

    async def main() -> None:
        stub = _SessionStub({"spec": 0.5, "crit": 0.05})
        pool = _one_instance_pool(stub)
        sampling = common_pb2.SamplingParams()
        spec_window = window("spec", [1, 2], 1, 0)
        finished: list[str] = []

        async def run(w: WindowRequest) -> None:
            await pool.verify(w, sampling, w.session_id)
            finished.append(w.session_id)

        spec = asyncio.ensure_future(run(spec_window))
        await asyncio.sleep(0.05)  # the speculative window holds the only instance
        crit_window = window("crit", [1, 2], 0, 1)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await run(crit_window)
        assert loop.time() - t0 < 0.2  # did not wait out the speculative forward (0.5 s)
        await spec
        assert finished == ["crit", "spec"]
        assert [name for name, _ in stub.calls] == ["spec", "crit", "spec"]
        assert stub.calls[0][1].cancelled and not stub.calls[2][1].cancelled
        assert spec_window.timing.preempted == 1 and spec_window.timing.acquired == 2
        assert crit_window.timing.preempted == 0 and crit_window.timing.acquired == 1
        await pool.close()

    asyncio.run(main())


def test_critical_windows_are_never_preempted() -> None:
    """A critical window waits for another critical one; a speculative window that became its
    request's critical path while running is not preempted either."""
    from dsi.v1 import common_pb2

    async def main() -> None:
        stub = _SessionStub({"first": 0.2, "promoted": 0.2, "crit": 0.01})
        pool = _one_instance_pool(stub)
        sampling = common_pb2.SamplingParams()
        loop = asyncio.get_running_loop()
        for name, rank in (("first", 0), ("promoted", 1)):
            running_window = window(name, [1], rank, 0)
            running = asyncio.ensure_future(pool.verify(running_window, sampling, "r"))
            await asyncio.sleep(0.02)
            pool.reprioritize(running_window, 0)
            t0 = loop.time()
            await pool.verify(window("crit", [1], 0, 1), sampling, "r")
            assert loop.time() - t0 >= 0.15  # waited for the running window to finish
            await running
            assert running_window.timing.preempted == 0 and running_window.timing.acquired == 1
        assert not any(call.cancelled for _, call in stub.calls)
        await pool.close()

    asyncio.run(main())


def test_preemption_stops_the_newest_requests_speculation_first() -> None:
    """Two instances run speculative windows of equal rank; a critical window preempts the one of
    the newer request (the queue's order backwards), however late the older one started."""
    from dsi.v1 import common_pb2

    async def main() -> None:
        stub = _SessionStub({"old": 0.3, "new": 0.3, "crit": 0.01})
        pool = TargetPool(["127.0.0.1:1", "127.0.0.1:2"], health_interval_s=60)
        for inst in pool.targets.all():
            inst.healthy = True
            inst.stub = stub  # type: ignore[assignment]
        sampling = common_pb2.SamplingParams()
        new_window, old_window = window("new", [1], 1, 5), window("old", [1], 1, 2)
        new = asyncio.ensure_future(pool.verify(new_window, sampling, "r"))
        await asyncio.sleep(0.02)
        old = asyncio.ensure_future(pool.verify(old_window, sampling, "r"))  # started later
        await asyncio.sleep(0.02)
        await pool.verify(window("crit", [1], 0, 9), sampling, "r")
        await asyncio.gather(new, old)
        assert new_window.timing.preempted == 1 and old_window.timing.preempted == 0
        await pool.close()

    asyncio.run(main())


def yielding(session: str, tokens: list[int], request_seq: int) -> WindowRequest:
    return WindowRequest(session, tokens, len(tokens), 0, request_seq, yields=True)


def test_a_critical_window_preempts_a_yielding_one_which_is_dropped() -> None:
    """A yielding window (rank 0, its request's critical path) gives its instance up to another
    request's critical window at once, its forward cancelled on the target, and is not sent again:
    its verify fails with Yielded."""
    from dsi.v1 import common_pb2

    async def main() -> None:
        stub = _SessionStub({"y": 0.5, "crit": 0.05})
        pool = _one_instance_pool(stub)
        sampling = common_pb2.SamplingParams()
        y_window = yielding("y", [1, 2], 0)
        y = asyncio.ensure_future(pool.verify(y_window, sampling, "y"))
        await asyncio.sleep(0.05)  # the yielding window holds the only instance
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await pool.verify(window("crit", [1, 2], 0, 1), sampling, "crit")
        assert loop.time() - t0 < 0.2  # did not wait out the yielding forward (0.5 s)
        with pytest.raises(Yielded):
            await y
        assert [name for name, _ in stub.calls] == ["y", "crit"]
        assert stub.calls[0][1].cancelled
        assert y_window.timing.preempted == 1 and y_window.timing.acquired == 1
        await pool.close()

    asyncio.run(main())


def test_a_yielding_window_never_waits_for_an_instance() -> None:
    from dsi.v1 import common_pb2

    async def main() -> None:
        stub = _SessionStub({"crit": 0.2, "y": 0.01})
        pool = _one_instance_pool(stub)
        sampling = common_pb2.SamplingParams()
        crit = asyncio.ensure_future(pool.verify(window("crit", [1], 0, 0), sampling, "crit"))
        await asyncio.sleep(0.02)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(Yielded):
            await pool.verify(yielding("y", [1], 1), sampling, "y")
        assert loop.time() - t0 < 0.1
        await crit
        assert [name for name, _ in stub.calls] == ["crit"]  # never sent
        assert not stub.calls[0][1].cancelled
        await pool.close()

    asyncio.run(main())


class _RecordingStub(_FakeStub):
    """Answers at once; records (prefix_length, tokens sent) per call; refuses one referenced prefix
    as a target whose cache lost it does."""

    def __init__(self) -> None:
        super().__init__(delay=0.0)
        self.sent: list[tuple[int, list[int]]] = []
        self.refuse_next_reference = False

    def Verify(self, request, timeout=None):  # type: ignore[no-untyped-def]  # noqa: N802
        from dsi.services.runtime.prefixes import PrefixHashes

        self.sent.append((request.prefix_length, list(request.token_ids)))
        if request.prefix_length:
            full = self.windows[-1][: request.prefix_length] + list(request.token_ids)
            assert request.prefix_hash == PrefixHashes(full).at(request.prefix_length)
            if self.refuse_next_reference:
                self.refuse_next_reference = False
                return _FailedCall(grpc.StatusCode.FAILED_PRECONDITION)
        return _FakeCall(self.delay, [7])


class _FailedCall:
    def __init__(self, code: grpc.StatusCode) -> None:
        self.code = code

    def cancel(self) -> None:
        pass

    def __await__(self):  # type: ignore[no-untyped-def]
        async def fail():  # type: ignore[no-untyped-def]
            raise grpc.aio.AioRpcError(self.code, grpc.aio.Metadata(), grpc.aio.Metadata(), "prefix not held")

        return fail().__await__()


def test_windows_send_only_what_the_instance_does_not_hold() -> None:
    """Incremental Verify: after the first window, a window sends the tokens after what the instance
    holds (the committed prefix and drafts it verified), referencing the rest by length and hash; a
    refused reference is sent again in full; after a cancel only what surely survived is referenced."""
    from dsi.v1 import common_pb2

    prompt = list(range(10, 110))  # 100 tokens

    async def main() -> None:
        stub = _RecordingStub()
        stub.windows = []  # type: ignore[attr-defined]
        pool = _one_instance_pool(stub)
        metrics = OrchestratorMetrics()
        pool.metrics = metrics
        sampling = common_pb2.SamplingParams()

        async def send(tokens: list[int], first: int, committed: int) -> None:
            stub.windows.append(tokens)  # type: ignore[attr-defined]
            w = WindowRequest("s", tokens, first, 0, 0, committed=committed)
            await pool.verify(w, sampling, "r")

        await send(prompt + [1, 2, 3], 100, 100)  # first window: everything
        await send(prompt + [1, 2, 3, 4, 5], 103, 100)  # same epoch, later drafts
        await send(prompt + [1, 2, 9, 4], 102, 102)  # a rejection at 102: new epoch
        stub.refuse_next_reference = True
        await send(prompt + [1, 2, 9, 4, 6], 104, 104)
        assert stub.sent == [
            (0, prompt + [1, 2, 3]),
            (103, [4, 5]),
            (102, [9, 4]),
            (104, [6]),  # refused: its cache lost it
            (0, prompt + [1, 2, 9, 4, 6]),  # sent again in full
        ]
        assert metrics.prefix_misses._value.get() == 1  # type: ignore[attr-defined]

        # A cancelled window: the cache may have been cut back to its first scored position.
        stub.delay = 10.0
        stub.windows.append(prompt + [1, 2, 9, 4, 6, 8, 8])  # type: ignore[attr-defined]
        slow = WindowRequest("s", prompt + [1, 2, 9, 4, 6, 8, 8], 105, 0, 0, committed=105)
        task = asyncio.ensure_future(pool.verify(slow, sampling, "r"))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stub.delay = 0.0
        await send(prompt + [1, 2, 9, 4, 6, 8, 7], 106, 106)
        assert stub.sent[-1] == (104, [6, 8, 7])  # 104 = first scored position of the cancelled one - 1
        await pool.close()

    asyncio.run(main())


def test_full_verify_sends_the_whole_sequence_every_time() -> None:
    from dsi.v1 import common_pb2

    async def main() -> None:
        stub = _RecordingStub()
        pool = _one_instance_pool(stub)
        pool.incremental = False
        for n in (5, 7):
            await pool.verify(WindowRequest("s", list(range(n)), n - 1, 0, 0, committed=n - 1),
                              common_pb2.SamplingParams(), "r")
        assert [k for k, _ in stub.sent] == [0, 0] and [len(t) for _, t in stub.sent] == [5, 7]
        await pool.close()

    asyncio.run(main())


async def _placement_pool(
    stub: _FakeStub | None = None, prefill_budget: float = PREFILL_BUDGET
) -> tuple[TargetPool, list[int]]:
    """Instances A, B, C; A holds session "s" (a 600-token prompt, which its window 0 prefilled
    there, as ``verify`` records it), B and C hold nothing of it."""
    pool = TargetPool(["A:1", "B:1", "C:1"], health_interval_s=60, prefill_budget=prefill_budget)
    for inst in pool.targets.all():
        inst.healthy = True
        if stub is not None:
            inst.stub = stub  # type: ignore[assignment]
    tokens = [t % 250 + 1 for t in range(600)]
    window0 = WindowRequest("s", tokens, 600, 0, 1, committed=600)
    pool.placement.track(window0)
    a = await pool.placement.acquire(window0)
    assert a.address == "A:1"
    pool.placement.verified(a, window0)
    pool.placement.untrack(window0)
    pool.placement.release(a)
    assert a.sessions["s"] == Held(tokens, 600, 600)
    return pool, tokens


async def _waits_for_a(pool: TargetPool, window: WindowRequest) -> None:
    """The window does not prefill cold on idle B: it waits until A (warm for it) is released, and
    gets A."""
    task = asyncio.ensure_future(pool.placement.acquire(window))
    await asyncio.sleep(0.01)
    assert not task.done() and not pool.targets.get("B:1").busy
    pool.targets.get("A:1").running = None
    pool.placement.release(pool.targets.get("A:1"))
    assert (await task).address == "A:1"


def _occupy(pool: TargetPool, address: str, session: str, rank: int = 0) -> None:
    """Mark the instance as running a window of another session (as verify does)."""
    from dsi.services.orchestrator.placement import Running

    inst = pool.targets.get(address)
    inst.busy = True
    inst.running = Running(window(session, [1], rank, 0), rank, 0.0, asyncio.get_running_loop().create_future())


def test_speculation_does_not_prefill_cold_under_load() -> None:
    """A speculative window waits for the instance warm for its request rather than compute a
    600-token prefix on an idle cold one while other requests use the pool; the scheduler sees no
    spare target for it."""

    async def main() -> None:
        pool, tokens = await _placement_pool()
        _occupy(pool, "A:1", "other")
        _occupy(pool, "C:1", "other")
        pool.placement.headroom = 0
        assert pool.spare() == 1 and pool.spare("s") == 0  # B is idle, but cold for "s"
        await _waits_for_a(pool, WindowRequest("s", tokens + [5, 6, 7, 8], 600, 1, 1, committed=600))
        await pool.close()

    asyncio.run(main())


def test_the_load_a_request_sees_counts_the_other_requests_under_way() -> None:
    """``load``: spare instances and the other requests under way (each counted once), which the
    dispatch rules weigh short windows against: those with windows running or waiting, and those
    between two windows (drafting their next: "s" here, with no window on the targets), until their
    scheduler ends."""

    async def main() -> None:
        pool, tokens = await _placement_pool(prefill_budget=float("inf"))
        assert pool.load("s") == Load(spare_targets=3, others=0, confined=None)
        _occupy(pool, "A:1", "other")
        _occupy(pool, "B:1", "other", rank=1)
        _occupy(pool, "C:1", "third")
        assert pool.load("s").others == 2 and pool.load("other").others == 2  # "s" and "third"
        waiting = asyncio.ensure_future(pool.placement.acquire(WindowRequest("fourth", [1, 2], 2, 0, 0)))
        await asyncio.sleep(0.01)
        assert not waiting.done() and pool.load("s").others == 3 and pool.load("s").spare_targets == 0
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        pool.placement.ended("s")  # "s" is over (its release, which forgets it, comes later)
        assert pool.load("other").others == 1 and "s" in pool.placement.committed
        await pool.close()

    asyncio.run(main())


def test_under_load_the_window_after_a_prefill_waits_for_the_instance_computing_it() -> None:
    """While instance A computes the prompt's prefill (window 0) of a new request, the full window
    sent right after it finds no instance holding the session yet; under load it waits for A (warm
    once the prefill ends) rather than prefill the prompt a second time on idle B."""
    from dsi.services.orchestrator.placement import Running

    async def main() -> None:
        pool, _ = await _placement_pool()
        prompt = [t % 200 + 3 for t in range(600)]
        loop = asyncio.get_running_loop()
        a = pool.targets.get("A:1")
        a.busy = True
        prefill = WindowRequest("p", prompt, 600, 0, 1, committed=600)
        a.running = Running(prefill, 0, 0.0, loop.create_future())
        _occupy(pool, "C:1", "other")
        spec = WindowRequest("p", prompt + [5, 6, 7, 8], 600, 1, 1, committed=600)
        task = asyncio.ensure_future(pool.placement.acquire(spec))
        await asyncio.sleep(0.01)
        assert not task.done() and not pool.targets.get("B:1").busy  # B is idle, but would prefill
        pool.placement.verified(a, prefill)
        a.running = None
        pool.placement.release(a)
        assert (await task).address == "A:1"
        await pool.close()

    asyncio.run(main())


def test_with_the_pool_to_itself_a_request_prefills_idle_instances_within_its_budget() -> None:
    """Alone on the pool, a request's speculation prefills its 600-token prompt on idle B or C only
    while its cold prefills stay within ``prefill_budget`` x 600 tokens (window 0's prefill on A
    counts): at 1.5 no second prefill fits, so its speculation waits for A and it is confined to A;
    at 2 one more fits (then no third: two instances of three); at inf every idle instance."""

    async def main() -> None:
        drafts = [5, 6, 7, 8] * 3
        for budget, extra in ((PREFILL_BUDGET, 0), (2.0, 1), (float("inf"), 2)):
            pool, tokens = await _placement_pool(prefill_budget=budget)
            _occupy(pool, "A:1", "s", rank=0)  # its own critical window, over drafts 0-3
            assert pool.spare("s") == extra
            assert pool.load("s").confined == (1 + extra if extra < 2 else None), budget  # of 3 healthy
            got = []
            for k in range(extra):  # speculative windows over drafts 4-7, 8-11: charged their committed part
                window = WindowRequest("s", tokens + drafts[: 4 * (k + 2)], 600 + 4 * (k + 1), 1 + k, 1,
                                       committed=600)
                inst = await pool.placement.acquire(window)
                _occupy(pool, inst.address, "s", rank=1 + k)
                got.append(inst.address)
            assert sorted(got) == ["B:1", "C:1"][:extra]
            if extra < 2:  # the next one waits for A (busy) rather than prefill an idle cold instance
                window = WindowRequest("s", tokens + drafts, 612, 3, 1, committed=600)
                task = asyncio.ensure_future(pool.placement.acquire(window))
                await asyncio.sleep(0.01)
                assert not task.done() and sum(i.busy for i in pool.targets.all()) == 1 + extra
                pool.targets.get("A:1").running = None
                pool.placement.release(pool.targets.get("A:1"))
                assert (await task).address == "A:1"
            await pool.close()

    asyncio.run(main())


def test_the_budget_grows_with_the_committed_length() -> None:
    """The budget is a multiple of what plain decoding has computed for the request so far: a request
    with a short prompt that has generated 600 tokens may catch an instance up on them (alone on the
    pool), where one with a 600-token prompt and nothing generated may not; once another request is
    under way, neither may."""

    async def main() -> None:
        pool, tokens = await _placement_pool()
        b = pool.targets.get("B:1")
        b.sessions["s"] = Held(tokens[:10], 10, 10)  # B prefilled the 10-token prompt, then lagged
        _occupy(pool, "A:1", "s", rank=0)
        window = WindowRequest("s", tokens + [5, 6, 7, 8], 600, 1, 1, committed=600)
        assert pool.spare("s") == 0  # A's 600 (charged) + B's 590 > 1.5 x 600
        pool.placement.forget("s")
        pool.placement.track(window)  # now 600 committed and nothing charged: 590 fits
        b.sessions["s"] = Held(tokens[:10], 10, 10)
        assert pool.spare("s") == 1 and pool.load("s").confined == 2
        _occupy(pool, "C:1", "other")  # another request under way: no cold catch-up
        assert pool.spare("s") == 0 and pool.load("s").confined is None
        pool.targets.get("C:1").running = None
        pool.placement.ended("other")
        assert (await pool.placement.acquire(window)).address == "B:1"
        await pool.close()

    asyncio.run(main())


def test_a_prefill_that_no_instance_could_avoid_is_not_limited_by_the_budget() -> None:
    """When no healthy instance holds the session (A, which held it, went down), the prefill on a
    cold instance is needed, whatever the budget left: it is placed at once."""

    async def main() -> None:
        pool, tokens = await _placement_pool()
        pool.targets.get("A:1").healthy = False
        window = WindowRequest("s", tokens + [5, 6], 600, 0, 1, committed=600)
        assert (await pool.placement.acquire(window)).address in ("B:1", "C:1")
        await pool.close()

    asyncio.run(main())


def test_a_window_waiting_for_the_prefilling_instance_is_handed_it_once_it_holds_the_session() -> None:
    """The window after a prefill waits for the instance computing it; when that call ends, the
    instance is recorded as holding the session *before* it is released to the queue, so the waiting
    window takes it rather than a cold idle one (which it would prefill a second time)."""
    from dsi.v1 import common_pb2

    async def main() -> None:
        stub = _SessionStub({"p": 0.05, "other": 10.0})
        pool, _ = await _placement_pool(stub)
        prompt = [t % 200 + 3 for t in range(600)]
        sampling = common_pb2.SamplingParams()
        _occupy(pool, "C:1", "other")  # another request uses the pool
        prefill = asyncio.ensure_future(pool.verify(WindowRequest("p", prompt, 600, 0, 1, committed=600),
                                                    sampling, "p"))
        await asyncio.sleep(0.01)
        (prefilling,) = [i for i in pool.targets.all() if i.running is not None and i.running.window.session_id == "p"]
        spec = WindowRequest("p", prompt + [5, 6, 7, 8], 600, 1, 1, committed=600)
        nxt = asyncio.ensure_future(pool.verify(spec, sampling, "p"))
        await prefill
        result = await nxt
        assert result.target == prefilling.address
        assert [s for s, _ in stub.calls].count("p") == 2
        await pool.close()

    asyncio.run(main())


def test_under_load_a_critical_window_takes_a_warm_instance_from_speculation() -> None:
    """Instead of prefilling 600 tokens on the idle cold instance, the critical window preempts the
    speculative window running on the warm one and gets that instance."""
    from dsi.v1 import common_pb2

    async def main() -> None:
        stub = _SessionStub({"s": 0.5})
        pool, tokens = await _placement_pool(stub)
        _occupy(pool, "C:1", "other")
        sampling = common_pb2.SamplingParams()
        spec = WindowRequest("s", tokens + [5, 6, 7, 8, 9, 1, 2, 3], 604, 1, 1, committed=600)
        spec_task = asyncio.ensure_future(pool.verify(spec, sampling, "s"))
        await asyncio.sleep(0.02)
        assert pool.targets.get("A:1").running is not None  # the speculative window holds warm A
        critical = WindowRequest("s", tokens + [5, 6, 7, 8], 600, 0, 1, committed=600)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        got = await pool.placement.acquire(critical)
        assert got.address == "A:1" and loop.time() - t0 < 0.2
        assert not pool.targets.get("B:1").busy  # no cold prefill
        assert spec.timing.preempted == 1
        pool.placement.release(got)
        pool.targets.get("C:1").running = None
        pool.placement.release(pool.targets.get("C:1"))
        await spec_task  # runs again once an instance it may use is free
        await pool.close()

    asyncio.run(main())


def test_a_short_sequence_is_warm_everywhere() -> None:
    """Catching up on fewer than COLD_TOKENS tokens is no prefill: any idle instance is spare."""
    from dsi.services.orchestrator.pool import COLD_TOKENS
    from dsi.services.runtime.prefixes import PrefixHashes

    async def main() -> None:
        pool = TargetPool(["A:1", "B:1", "C:1"], health_interval_s=60)
        for inst in pool.targets.all():
            inst.healthy = True
        tokens = list(range(1, COLD_TOKENS))
        pool.placement.committed["s"] = PrefixHashes(tokens)
        pool.targets.get("A:1").sessions["s"] = Held(tokens, len(tokens), len(tokens))
        _occupy(pool, "A:1", "other")
        assert pool.spare() == 2
        # B and C have never seen it, yet are not cold for it; one stays free for "other" (headroom).
        assert pool.spare("s") == 1
        pool.placement.headroom = 0
        assert pool.spare("s") == 2
        await pool.close()

    asyncio.run(main())


def test_under_load_a_critical_window_waits_for_its_warm_instance_rather_than_prefill_cold() -> None:
    """The warm instance computes another request's critical window (nothing to preempt): the
    critical window waits for it (one forward) instead of computing 600 tokens on the idle cold B."""

    async def main() -> None:
        pool, tokens = await _placement_pool()
        _occupy(pool, "A:1", "other", rank=0)
        _occupy(pool, "C:1", "other", rank=0)
        await _waits_for_a(pool, WindowRequest("s", tokens + [5, 6, 7, 8], 600, 0, 1, committed=600))
        await pool.close()

    asyncio.run(main())


def test_a_critical_window_prefills_cold_when_no_instance_holds_its_session() -> None:
    async def main() -> None:
        pool, tokens = await _placement_pool()
        pool.targets.get("A:1").mark_down("gone")  # the only warm instance
        _occupy(pool, "C:1", "other", rank=0)
        critical = WindowRequest("s", tokens + [5, 6, 7, 8], 600, 0, 1, committed=600)
        assert (await asyncio.wait_for(pool.placement.acquire(critical), 1.0)).address == "B:1"
        await pool.close()

    asyncio.run(main())


def test_an_instance_holding_the_prefix_but_not_the_window_does_not_keep_it_waiting() -> None:
    """A holds the session's committed 600 tokens but the window scores from 300 drafts further on:
    A is no better than a cold instance, so the critical window takes the idle B rather than wait for
    an instance that would have to catch up anyway (it used to wait until the pool went quiet)."""

    async def main() -> None:
        pool, tokens = await _placement_pool()
        _occupy(pool, "A:1", "other", rank=0)
        _occupy(pool, "C:1", "other", rank=0)
        drafts = list(range(1, 301))
        critical = WindowRequest("s", tokens + drafts, 900, 0, 1, committed=600)
        assert (await asyncio.wait_for(pool.placement.acquire(critical), 1.0)).address == "B:1"
        await pool.close()

    asyncio.run(main())


def test_a_window_waiting_for_its_warm_instance_leaves_the_free_ones_to_others() -> None:
    """The session's critical window waits for warm A; a short window of another request arriving
    next takes the idle B at once, and nothing is preempted for the waiting one."""

    async def main() -> None:
        pool, tokens = await _placement_pool()
        _occupy(pool, "A:1", "other", rank=0)
        _occupy(pool, "C:1", "third", rank=1)  # speculation that must not be stopped for nothing
        critical = WindowRequest("s", tokens + [5, 6, 7, 8], 600, 0, 1, committed=600)
        waiting = asyncio.ensure_future(pool.placement.acquire(critical))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        assert not pool.targets.get("C:1").running.preempt.done()
        short = WindowRequest("x", [1, 2, 3, 4], 3, 1, 2, committed=3)
        assert (await asyncio.wait_for(pool.placement.acquire(short), 1.0)).address == "B:1"
        pool.targets.get("A:1").running = None
        pool.placement.release(pool.targets.get("A:1"))
        assert (await waiting).address == "A:1"
        await pool.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("arg", "budget"), [(None, 1.5), ("1", 1.0), ("inf", float("inf")), ("0.5", None), ("nan", None)]
)
def test_the_prefill_budget_flag(arg: str | None, budget: float | None) -> None:
    """``--prefill-budget``: 1.5 by default, ``inf`` allowed, below 1 (less than the prefill plain
    decoding needs) or nan refused with a message."""
    import argparse

    from dsi.services.orchestrator.settings import add_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--targets", "a:1"] + ([] if arg is None else ["--prefill-budget", arg])
    if budget is None:
        with pytest.raises(SystemExit, match="--prefill-budget must be >= 1"):
            settings_from_args(parser.parse_args(argv))
    else:
        assert settings_from_args(parser.parse_args(argv)).prefill_budget == budget


@pytest.mark.parametrize(("argv", "env", "on"), [([], {}, True), (["--no-yielding-windows"], {}, False),
                                                 ([], {"DSI_ORCHESTRATOR_NO_YIELDING_WINDOWS": "1"}, False)])
def test_the_yielding_windows_flag(argv: list[str], env: dict[str, str], on: bool,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from dsi.services.orchestrator.settings import add_arguments, settings_from_args

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert settings_from_args(parser.parse_args(["--targets", "a:1", *argv])).yielding_windows is on
