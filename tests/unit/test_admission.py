"""Admission of Generate requests: bounded concurrency, a bounded first-come first-served queue,
and refusals with a retry hint instead of unbounded waiting."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from dsi.services.orchestrator.admission import Admission, Busy

pytestmark = pytest.mark.unit


def test_requests_beyond_the_slots_wait_in_order_and_beyond_the_queue_are_refused() -> None:
    async def main() -> tuple[list[str], list[str], int]:
        adm = Admission(max_active=2, max_queued=2, max_wait_s=10)
        release = asyncio.Event()
        order: list[str] = []
        refused: list[str] = []

        async def request(name: str) -> None:
            try:
                async with adm.slot():
                    order.append(name)
                    await release.wait()
            except Busy as exc:
                assert exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED and exc.retry_after_s > 0
                refused.append(name)

        tasks = []
        for name in "abcde":
            tasks.append(asyncio.ensure_future(request(name)))
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        running_at_peak = adm.active
        release.set()
        await asyncio.gather(*tasks)
        assert adm.active == 0 and adm.queued == 0
        return order, refused, running_at_peak

    order, refused, peak = asyncio.run(main())
    assert peak == 2
    assert order == ["a", "b", "c", "d"]  # first come, first served
    assert refused == ["e"]  # the queue held two


def test_a_request_that_waits_too_long_is_refused_and_a_cancelled_waiter_leaves_the_queue() -> None:
    async def main() -> None:
        adm = Admission(max_active=1, max_queued=4, max_wait_s=0.05)
        hold = asyncio.Event()

        async def holder() -> None:
            async with adm.slot():
                await hold.wait()

        h = asyncio.ensure_future(holder())
        await asyncio.sleep(0)
        with pytest.raises(Busy, match="waited 0.05 s"):
            async with adm.slot():
                pass
        waiter = asyncio.ensure_future(adm.slot().__aenter__())
        await asyncio.sleep(0)
        assert adm.queued == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert adm.queued == 0
        hold.set()
        await h
        assert adm.active == 0

    asyncio.run(main())
