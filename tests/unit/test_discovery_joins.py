"""Targets that appear in DNS after start-up, wired as the orchestrator wires them (``TargetDiscovery``
reporting to ``TargetPool.set_addresses``), against fake targets served by in-process grpc.aio
servers: a newcomer joins the pool and gets windows; one serving another vocabulary must not."""

from __future__ import annotations

import asyncio

import pytest

from dsi.services.orchestrator.discovery import TargetDiscovery
from dsi.services.orchestrator.pool import TargetPool
from dsi.services.orchestrator.scheduler import WindowRequest
from dsi.services.orchestrator.server import _target_info
from dsi.v1 import common_pb2
from tests.unit.fake_target_server import FakeTargetServer, wait_for

pytestmark = pytest.mark.unit

SAMPLING = common_pb2.SamplingParams()
SPEC = "dns:///targets:50061"


class Table:
    """A resolver answering from a table the test edits (the endpoints, ports included)."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses

    async def __call__(self, host: str, port: int) -> list[str]:
        assert (host, port) == ("targets", 50061)
        return list(self.addresses)


async def _cluster(first: FakeTargetServer) -> tuple[TargetPool, TargetDiscovery, Table]:
    """The first target alone in DNS; discovery re-resolves and the pool health-checks every 50 ms."""
    table = Table([first.address])
    pool = TargetPool([], health_interval_s=0.05)
    discovery = TargetDiscovery([SPEC], pool.set_addresses, interval_s=0.05, resolver=table)
    await discovery.refresh()
    await pool.start()
    discovery.start()
    assert await pool.wait_healthy(10)
    assert pool.addresses == [first.address]
    await _target_info(pool)  # what the server does next: the targets' model, required of newcomers
    return pool, discovery, table


async def _two_windows_at_once(pool: TargetPool, targets: list[FakeTargetServer]) -> list[str]:
    """Two windows of two requests in flight together (each target holds its answer until both
    arrived somewhere, or until one waited 1 s alone); the addresses that computed them."""
    hold = asyncio.Event()
    for t in targets:
        t.hold = hold
    tasks = [asyncio.ensure_future(pool.verify(WindowRequest(f"s{i}", [1, 2, 3], 3, 0, i), SAMPLING, f"r{i}"))
             for i in range(2)]
    try:
        await wait_for(lambda: sum(len(t.calls) for t in targets) == 2, timeout_s=1.0)
    except AssertionError:
        pass  # only one instance takes windows: the second waits for the first
    hold.set()
    return [r.target for r in await asyncio.gather(*tasks)]


def test_a_target_that_appears_later_in_dns_joins_the_pool_and_gets_windows() -> None:
    async def main() -> None:
        a, b = FakeTargetServer(), FakeTargetServer()
        await a.start()
        await b.start()
        pool, discovery, table = await _cluster(a)
        try:
            table.addresses = [a.address, b.address]  # a replica is scaled up
            await wait_for(lambda: pool.healthy_count() == 2, what="the new target to be healthy in the pool")
            assert sorted(pool.addresses) == sorted([a.address, b.address])
            assert pool.sp_limit() == 2
            # One window at a time per instance: two windows at once run one on each.
            assert sorted(await _two_windows_at_once(pool, [a, b])) == sorted([a.address, b.address])
            assert len(b.calls) == 1 and b.answered == 1
            # Scaled back down: the replica leaves the pool and gets nothing more.
            table.addresses = [a.address]
            await wait_for(lambda: pool.addresses == [a.address], what="the target to be retired")
            assert pool.healthy_count() == 1
            assert await _two_windows_at_once(pool, [a, b]) == [a.address, a.address]
            assert len(b.calls) == 1
        finally:
            await discovery.stop()
            await pool.close()
            await a.stop()
            await b.stop()

    asyncio.run(main())


def test_a_later_target_with_another_vocabulary_is_refused() -> None:
    async def main() -> None:
        a = FakeTargetServer(vocab_size=384, vocab_fingerprint="vocab-a")
        other = FakeTargetServer(vocab_size=300, vocab_fingerprint="vocab-b")
        await a.start()
        await other.start()
        pool, discovery, table = await _cluster(a)
        try:
            table.addresses = [a.address, other.address]
            await wait_for(lambda: other.address in pool.addresses, what="discovery to report the new target")
            for _ in range(3):
                await pool.check_health()
            assert pool.healthy_count() == 1
            assert await _two_windows_at_once(pool, [a, other]) == [a.address, a.address]
            assert other.calls == []  # it would score ids of another tokenizer
        finally:
            await discovery.stop()
            await pool.close()
            await a.stop()
            await other.stop()

    asyncio.run(main())
