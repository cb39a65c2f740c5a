"""Who may serve windows: a target that comes up later (found by DNS, or restarted) joins only if it
serves the pool's vocabulary, and a target out of device memory (RESOURCE_EXHAUSTED) is overloaded,
not dead: the window goes elsewhere and the instance stays in the pool. Fake targets are real
in-process grpc.aio servers (tests/unit/fake_target_server.py)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from dsi.services.orchestrator.pool import TargetPool, model_mismatch
from dsi.services.orchestrator.scheduler import WindowRequest
from dsi.services.runtime.errors import _status_for
from dsi.services.runtime.model_errors import DeviceOutOfMemory
from dsi.v1 import common_pb2
from tests.unit.fake_target_server import FakeTargetServer

pytestmark = pytest.mark.unit

SAMPLING = common_pb2.SamplingParams()


class OutOfMemoryTarget(FakeTargetServer):
    """Answers its first ``exhausted`` Verify calls with RESOURCE_EXHAUSTED (a device OOM)."""

    exhausted = 1
    refused = 0

    async def Verify(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        if self.exhausted > 0:
            self.exhausted -= 1
            self.refused += 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "device out of memory on 4 tokens")
        return await super().Verify(request, context)


def _model(vocab: int = 384, fingerprint: str = "vocab-a") -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(model="fake", vocab_size=vocab, vocab_fingerprint=fingerprint)


def test_model_mismatch_names_what_differs() -> None:
    assert model_mismatch(_model(), _model()) == ""
    assert "400 logits" in model_mismatch(_model(), _model(vocab=400))
    assert "different vocabulary" in model_mismatch(_model(), _model(fingerprint="vocab-b"))


def test_a_target_joining_later_must_serve_the_pools_vocabulary() -> None:
    async def main() -> None:
        first, same, other = FakeTargetServer(), FakeTargetServer(), FakeTargetServer(vocab_fingerprint="vocab-b")
        addresses = [await t.start() for t in (first, same, other)]
        pool = TargetPool(addresses[:1], health_interval_s=60)
        try:
            await pool.start()
            assert await pool.wait_healthy(10)
            pool.require_model(_model())
            pool.set_addresses(addresses)  # as discovery does when DNS returns more addresses
            await pool.check_health()
            assert pool.healthy_count() == 2
            refused = pool.targets.get(addresses[2])
            assert refused is not None and not refused.healthy
            assert refused.last_error.startswith("incompatible: it serves a different vocabulary")
            # Windows go to the compatible instances only.
            for i in range(4):
                result = await pool.verify(WindowRequest(f"s{i}", [1, 2, 3], 2, rank=0, request_seq=i), SAMPLING, "r")
                assert result.target in addresses[:2]
            assert other.calls == []
            # Still refused at the next health round; a compatible one is admitted.
            await pool.check_health()
            assert pool.healthy_count() == 2 and not pool.targets.get(addresses[2]).healthy
        finally:
            await pool.close()
            for t in (first, same, other):
                await t.stop()

    asyncio.run(main())


def test_a_device_out_of_memory_is_an_overload_not_a_dead_target() -> None:
    async def main() -> None:
        a, b = OutOfMemoryTarget(), OutOfMemoryTarget()  # each refuses its first window
        addresses = [await t.start() for t in (a, b)]
        pool = TargetPool(addresses, health_interval_s=60)
        try:
            await pool.start()
            assert await pool.wait_healthy(10, count=2)
            results = [await pool.verify(WindowRequest(f"s{i}", [1, 2, 3, 4], 2, rank=0, request_seq=i), SAMPLING, "r")
                       for i in range(2)]
            # Every refusal was retried (on the other instance or, still in the pool, the same one) ...
            assert a.refused == b.refused == 1
            assert sum(r.retries for r in results) == 2
            assert pool.healthy_count() == 2  # ... and nobody was marked down
            assert a.answered + b.answered == 2
            assert all(r.token_ids == [7, 7, 7] for r in results)
        finally:
            await pool.close()
            for t in (a, b):
                await t.stop()

    asyncio.run(main())


def test_a_device_out_of_memory_maps_to_resource_exhausted_by_type_not_by_message() -> None:
    assert _status_for(DeviceOutOfMemory("device out of memory on 9 tokens"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = _status_for(RuntimeError("the model ran out of memory somewhere"))
    assert status is None or status[0] != grpc.StatusCode.RESOURCE_EXHAUSTED


def test_an_instance_never_healthy_is_reported_with_its_reason() -> None:
    async def main() -> None:
        down = FakeTargetServer(serving=False)
        address = await down.start()
        pool = TargetPool([address], health_interval_s=60)
        try:
            await pool.check_health()
            assert f"{address} (not serving)" in pool.unavailable_message()
        finally:
            await pool.close()
            await down.stop()

    asyncio.run(main())
