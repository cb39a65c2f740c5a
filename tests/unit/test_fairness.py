"""No request starves: many DSI requests sharing three target instances through the pool's real
``Placement`` (queue by rank then request age, preemption of speculation, re-ranking), on a virtual
clock. The measure is the longest time a request goes without a commit once it has started.

Why a bound holds: a queued window that becomes its request's critical window is re-ranked to 0
(``Scheduler._apply_ready`` -> ``Placement.reprioritize``), and critical windows are served in
request-age order, speculation preempted for them. Requests start in arrival order (first come,
first served), so a started request's critical window waits only behind those of the few older
requests still running, each with one critical window at a time: a few forwards, whatever the
number of requests (measured 2-7.5 forwards for 4-32 requests). Had a queued window kept the rank
it was queued with (the pool before the fix), every younger request's new rank-0 window would
overtake it: measured 36-170 forwards, growing with the number of requests."""

from __future__ import annotations

import asyncio

import pytest

from dsi.services.orchestrator.scheduler import Scheduler, SchedulerConfig
from tests.unit.fakes import FakeDrafter, PlacedTarget, RequestTarget, reference, run_virtual

pytestmark = pytest.mark.unit

FORWARD_S = 1.0  # one target forward (virtual seconds)
INSTANCES = 3
NEW_TOKENS = 30
# Longest time a started request may go without a commit: a few forwards, independent of the load.
GAP_BOUND_S = 10 * FORWARD_S


def _serve(requests: int, every_s: float, acceptance: float,
           rerank: bool = True) -> dict[int, tuple[float, list[float]]]:
    """``requests`` DSI requests, one every ``every_s``; per request its arrival and commit times."""
    shared = PlacedTarget(INSTANCES, FORWARD_S, rerank)
    out: dict[int, tuple[float, list[float]]] = {}

    async def one(i: int) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(i * every_s)
        arrived, commits, ids = loop.time(), [], []
        prompt = [1, 2, 3 + i]
        sched = Scheduler(RequestTarget(shared, f"s{i}"),
                          FakeDrafter(latency=0.05, acceptance=acceptance, salt=i),
                          SchedulerConfig(mode="dsi", lookahead=3, max_new_tokens=NEW_TOKENS), f"s{i}", request_seq=i)
        await sched.run(prompt, lambda tok: commits.append(loop.time()) or ids.append(tok.token_id) or False)
        assert ids == reference(prompt, NEW_TOKENS)
        out[i] = (arrived, commits)

    async def main() -> None:
        # Virtual seconds: a livelock that keeps timers running fails here rather than hanging.
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(requests))), 5000.0)

    run_virtual(main)
    return out


def _longest_gap(commits: list[float]) -> float:
    return max(b - a for a, b in zip(commits, commits[1:], strict=False))


SCENARIOS = [  # (requests, seconds between arrivals, acceptance)
    pytest.param(16, 2.0, 0.5, id="16-requests-every-2s"),
    pytest.param(32, 0.5, 0.8, id="32-requests-every-0.5s"),
]


@pytest.mark.parametrize(("requests", "every_s", "acceptance"), SCENARIOS)
def test_no_started_request_goes_long_without_a_token(requests: int, every_s: float, acceptance: float) -> None:
    served = _serve(requests, every_s, acceptance)
    gaps = {i: _longest_gap(commits) for i, (_, commits) in served.items()}
    worst = max(gaps, key=gaps.__getitem__)
    assert gaps[worst] <= GAP_BOUND_S, f"request {worst} went {gaps[worst]:.1f} s without a token: {gaps}"
    # First come, first served: no request finishes before an older one got its first token.
    for i, (_, older) in served.items():
        for j, (_, younger) in served.items():
            if j > i:
                assert younger[-1] >= older[0], f"request {j} finished before request {i} got a token"


@pytest.mark.parametrize(("requests", "every_s", "acceptance"), SCENARIOS)
def test_without_reranking_queued_windows_a_request_starves(requests: int, every_s: float, acceptance: float) -> None:
    """The control: the same load with queued windows keeping the rank they were queued with. The
    gap measured above then exceeds the bound many times over, so the bound tells the two apart."""
    served = _serve(requests, every_s, acceptance, rerank=False)
    assert max(_longest_gap(commits) for _, commits in served.values()) > 3 * GAP_BOUND_S
