"""TargetPool failure handling through its public methods, against fake targets served by real
in-process grpc.aio servers: a window whose call fails with UNAVAILABLE is retried on another
instance (and counted), the failing instance is marked down and gets no more windows until a health
check passes again, a non-retryable error reaches the caller untouched, and when no instance can take
the window the caller gets ``Unavailable`` naming the endpoints."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from dsi.services.orchestrator.metrics import OrchestratorMetrics
from dsi.services.orchestrator.pool import TargetPool, Unavailable
from dsi.services.orchestrator.scheduler import WindowRequest
from dsi.v1 import common_pb2
from tests.unit.fake_target_server import FakeTargetServer, Faults

pytestmark = pytest.mark.unit

SAMPLING = common_pb2.SamplingParams()


def window(session: str, tokens: list[int], first: int) -> WindowRequest:
    return WindowRequest(session, tokens, first, rank=0, request_seq=0)


async def _started(*targets: FakeTargetServer) -> list[str]:
    return [await t.start() for t in targets]


async def _stop(pool: TargetPool, *targets: FakeTargetServer) -> None:
    await pool.close()
    for t in targets:
        await t.stop()


def test_a_window_failing_with_unavailable_is_retried_on_another_instance_which_is_kept() -> None:
    async def main() -> None:
        faults = Faults()
        a, b = FakeTargetServer(faults=faults), FakeTargetServer(faults=faults)
        addresses = await _started(a, b)
        metrics = OrchestratorMetrics()
        pool = TargetPool(addresses, health_interval_s=60, metrics=metrics)
        try:
            await pool.start()
            assert await pool.wait_healthy(10, count=2)
            faults.unavailable = 1  # the first Verify, on whichever instance the pool picks, fails
            result = await pool.verify(window("s", [1, 2, 3, 4], 2), SAMPLING, "r1")
            (failed,) = [t for t in (a, b) if t.failed]
            (served,) = [t for t in (a, b) if t.answered]
            assert failed is not served and failed.failed == 1
            assert result.target == served.address
            assert result.retries == 1
            assert result.token_ids == [7, 7, 7]  # positions 2..4, computed by the instance that answered
            assert metrics.registry.get_sample_value("dsi_window_retries_total") == 1
            # The failing instance is marked down: one fewer window in flight at once, its error on record.
            assert pool.healthy_count() == 1 and pool.sp_limit() == 1
            assert f"{failed.address} (UNAVAILABLE" in pool.unavailable_message()
            # ... and gets no more windows (of this or other sessions) while it is down.
            for i in range(3):
                again = await pool.verify(window(f"t{i}", [5, 6, 7], 3), SAMPLING, f"r{i + 2}")
                assert again.target == served.address and again.retries == 0
            assert len(failed.calls) == 1
            assert metrics.registry.get_sample_value("dsi_window_retries_total") == 1
            # A passing health check brings it back.
            await pool.check_health()
            assert pool.healthy_count() == 2
        finally:
            await _stop(pool, a, b)

    asyncio.run(main())


def test_when_every_instance_fails_the_caller_gets_unavailable_naming_the_endpoints() -> None:
    async def main() -> None:
        a, b = FakeTargetServer(mode="unavailable"), FakeTargetServer(mode="unavailable")
        addresses = await _started(a, b)
        metrics = OrchestratorMetrics()
        pool = TargetPool(addresses, health_interval_s=60, max_retries=1, metrics=metrics)
        try:
            await pool.start()
            assert await pool.wait_healthy(10, count=2)
            with pytest.raises(Unavailable) as err:
                await asyncio.wait_for(pool.verify(window("s", [1, 2, 3], 3), SAMPLING, "r1"), timeout=20)
            # Tried once on each instance (the retry went to the other one), then gave up.
            assert len(a.calls) == 1 and len(b.calls) == 1
            assert pool.healthy_count() == 0
            for address in addresses:
                assert f"{address} (UNAVAILABLE" in str(err.value)
            assert metrics.registry.get_sample_value("dsi_window_retries_total") == 2
        finally:
            await _stop(pool, a, b)

    asyncio.run(main())


def test_with_no_healthy_instance_a_window_gets_unavailable_instead_of_waiting_forever() -> None:
    async def main() -> None:
        a = FakeTargetServer(serving=False)
        addresses = await _started(a)
        pool = TargetPool(addresses, health_interval_s=0.1)
        try:
            await pool.start()
            assert pool.healthy_count() == 0
            with pytest.raises(Unavailable) as err:
                await asyncio.wait_for(pool.verify(window("s", [1, 2, 3], 3), SAMPLING, "r1"), timeout=30)
            assert f"endpoints tried: {a.address} (" in str(err.value)
            assert a.calls == []  # never sent to an instance that is not healthy
        finally:
            await _stop(pool, a)

    asyncio.run(main())


def test_a_non_retryable_error_reaches_the_caller_and_keeps_the_instance() -> None:
    async def main() -> None:
        a = FakeTargetServer(mode="invalid")
        addresses = await _started(a)
        metrics = OrchestratorMetrics()
        pool = TargetPool(addresses, health_interval_s=60, metrics=metrics)
        try:
            await pool.start()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(pool.verify(window("s", [1, 2, 3], 3), SAMPLING, "r1"), timeout=20)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert len(a.calls) == 1  # not retried
            assert pool.healthy_count() == 1  # the request was bad, not the instance
            assert (metrics.registry.get_sample_value("dsi_window_retries_total") or 0) == 0
        finally:
            await _stop(pool, a)

    asyncio.run(main())
