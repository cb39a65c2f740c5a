"""A client cancel stops everything, wherever it lands: before the first token, mid-window, at an
epoch boundary, during a retry on another target. Within 0.5 s of the cancel no session of the
request is left on any target or the drafter, and afterwards no Verify or draft runs (the services'
counters stand still). Real processes: 3 emulated targets, an oracle drafter, the orchestrator."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import pytest

from dsi.client import AsyncClient
from dsi.v1 import drafter_pb2, drafter_pb2_grpc, target_pb2, target_pb2_grpc
from tests.integration.procs import Service, start_service

pytestmark = pytest.mark.integration

RELEASE_WITHIN_S = 0.5
FORWARD_MS = 40  # each emulated target forward; drafts take 3 ms


class Cluster:
    def __init__(self, model: Path, log_dir: Path) -> None:
        self.targets = [start_service("target", ["--model", str(model), "--threads", "1",
                                                 "--emulate-latency-ms", f"{FORWARD_MS}:{FORWARD_MS}"], log_dir)
                        for _ in range(3)]
        self.drafter = start_service("drafter", ["--model", str(model), "--threads", "1", "--emulate-latency-ms",
                                                 "3:3", "--oracle-acceptance", "0.7"], log_dir)
        self.orch = start_service("orchestrator", [
            "--targets", ",".join(t.address for t in self.targets), "--drafter", self.drafter.address,
            "--health-interval-s", "0.25", "--lookahead", "3"], log_dir)
        self.live: list[Service] = list(self.targets)

    def stop(self) -> None:
        for s in [self.orch, self.drafter, *self.targets]:
            s.stop()

    def counters(self) -> tuple[list[tuple[int, int, int]], tuple[int, int, int]]:
        """(sessions, calls, forwards completed) per live target and of the drafter."""
        targets = []
        for t in self.live:
            with grpc.insecure_channel(t.address) as ch:
                c = target_pb2_grpc.TargetServiceStub(ch).Info(target_pb2.TargetInfoRequest(), timeout=5).counters
            targets.append((c.sessions, c.calls, c.forwards_completed))
        with grpc.insecure_channel(self.drafter.address) as ch:
            c = drafter_pb2_grpc.DrafterServiceStub(ch).Info(drafter_pb2.DrafterInfoRequest(), timeout=5).counters
        return targets, (c.sessions, c.calls, c.forwards_completed)

    def sessions(self) -> int:
        targets, drafter = self.counters()
        return sum(t[0] for t in targets) + drafter[0]


@pytest.fixture(scope="module")
def cluster(tiny_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tiny_pair[0], tmp_path_factory.mktemp("cancel-logs"))
    try:
        yield c
    finally:
        c.stop()


# Each trigger awaits the moment to cancel at, given the stream's deltas as they arrive.
Trigger = Callable[["asyncio.Queue[int]"], Awaitable[None]]


async def _cancel_when(cluster: Cluster, trigger: Trigger) -> tuple[float, int]:
    """Run one DSI request, cancel its client task when ``trigger`` returns; the monotonic time of the
    cancel and the tokens received."""
    arrived: asyncio.Queue[int] = asyncio.Queue()
    received = 0

    async with AsyncClient(cluster.orch.address, timeout=60) as client:
        async def consume() -> None:
            nonlocal received
            async for d in client.stream("def fibonacci(n):", max_new_tokens=200, mode="dsi", ignore_eos=True):
                received += len(d.tokens)
                arrived.put_nowait(received)

        task = asyncio.create_task(consume())
        moment = asyncio.create_task(trigger(arrived))
        await asyncio.wait({task, moment}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            moment.cancel()
            task.result()  # raises what the request raised
            raise AssertionError("the request ended before the moment to cancel it")
        assert moment.done(), "the moment to cancel never came"
        moment.result()
        task.cancel()
        cancelled_at = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
    return cancelled_at, received


def _assert_everything_stopped(cluster: Cluster, cancelled_at: float, what: str) -> None:
    while cluster.sessions() > 0:
        assert time.monotonic() - cancelled_at < RELEASE_WITHIN_S, (
            f"{what}: sessions left {RELEASE_WITHIN_S} s after the cancel: {cluster.counters()}")
        time.sleep(0.01)
    before = cluster.counters()
    time.sleep(3 * FORWARD_MS / 1000)  # a Verify or a draft still running would finish in this time
    assert cluster.counters() == before, f"{what}: work still ran for the cancelled request"


async def _before_first_token(arrived: asyncio.Queue[int]) -> None:
    await asyncio.sleep(0.005)
    assert arrived.empty()


async def _mid_window(arrived: asyncio.Queue[int]) -> None:
    await arrived.get()
    await asyncio.sleep(FORWARD_MS / 2000)  # halfway through the next windows' forwards


async def _at_an_epoch_boundary(arrived: asyncio.Queue[int]) -> None:
    # Tokens arrive when windows are applied: that is where an epoch ends (a rejection or a resync)
    # and the next one opens. Cancel right as the third batch of commits arrives.
    for _ in range(3):
        await arrived.get()


@pytest.mark.parametrize("point", [_before_first_token, _mid_window, _at_an_epoch_boundary],
                         ids=["before-first-token", "mid-window", "epoch-boundary"])
def test_a_cancel_stops_all_work_and_releases_every_session(cluster: Cluster, point: Trigger) -> None:
    assert cluster.sessions() == 0
    cancelled_at, received = asyncio.run(_cancel_when(cluster, point))
    assert received < 200
    _assert_everything_stopped(cluster, cancelled_at, point.__name__)


def test_a_cancel_during_a_retry_stops_all_work_and_releases_every_session(cluster: Cluster) -> None:
    """A target is killed mid-request: its window is retried on another instance, and the client
    cancels while the retry is in flight (seen in the orchestrator's log)."""
    assert cluster.sessions() == 0
    log = cluster.orch.log
    retries_before = log.read_text().count("retrying window on another target")

    async def during_a_retry(arrived: asyncio.Queue[int]) -> None:
        await arrived.get()
        victim = cluster.live.pop(0)
        victim.kill()
        deadline = time.monotonic() + 10
        while log.read_text().count("retrying window on another target") == retries_before:
            assert time.monotonic() < deadline, "no window was retried after the kill"
            await asyncio.sleep(0.002)

    cancelled_at, received = asyncio.run(_cancel_when(cluster, during_a_retry))
    assert received < 200
    _assert_everything_stopped(cluster, cancelled_at, "during a retry")
