"""Conformance: the real scheduler, run on a virtual clock against scripted fakes, and the simulators
run on the same script, commit at the same times.

One request: the paper's time model (``dsi.sim.model._dsi_run``). Several requests sharing the
targets: the multi-request simulator (``dsi.sim.cluster``), which drives the same rules module
(``policy.py``) as the scheduler, against the real ``Scheduler`` with the pool's real ``Placement``
(queue, re-ranking, preemption, spare targets) in ``fakes.PlacedTarget``; every commit of every
request, its time and whether it was an accepted draft must agree.

The script: target latency 1, drafter latency c per draft, N target instances, lookahead L, and per
epoch the index K of its first rejected draft (the simulator's whole randomness). The scheduler's
drafter proposes the target's token except at index K of each epoch (counted from the epoch's first
position), so both see the same acceptances. For one request alone the load-aware rules in
``policy.py`` reduce to the simulator's rules (every idle target is spare), so the time at which the
run has committed ``tokens`` tokens must be equal."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import numpy as np
import pytest

from dsi.services.orchestrator.scheduler import CommittedToken, Draft, Scheduler, SchedulerConfig, Source, WindowRequest
from dsi.sim.cluster import ClusterRequest, ClusterSettings, simulate_cluster
from dsi.sim.model import _dsi_run
from tests.unit.fakes import (
    VOCAB,
    CreditStream,
    FakeTarget,
    PlacedTarget,
    RequestTarget,
    coin,
    reference,
    run_virtual,
    target_token,
)

pytestmark = pytest.mark.unit

PROMPT = [3, 1, 4, 1, 5]


class ScriptedStream(CreditStream):
    """Drafts at ``latency`` each under credit; the draft at epoch index K is wrong."""

    def __init__(self, latency: float, prefix: list[int], credit: int, reject_at: int) -> None:
        super().__init__(prefix, credit)
        self._latency, self.base, self.reject_at = latency, len(prefix), reject_at

    @property
    def latency(self) -> float:
        return self._latency

    def next_draft(self, seq: list[int]) -> Draft:
        right = target_token(seq)
        return Draft((right + 1) % VOCAB if len(seq) - self.base == self.reject_at else right)


class ScriptedDrafter:
    def __init__(self, latency: float, first_rejects: list[int]) -> None:
        self.latency, self.first_rejects = latency, list(first_rejects)
        self.epochs = 0

    def open(self, session_id: str, prefix: list[int], max_tokens: int, return_probs: bool) -> ScriptedStream:
        k = self.first_rejects[self.epochs] if self.epochs < len(self.first_rejects) else 10**9
        self.epochs += 1
        return ScriptedStream(self.latency, prefix, max_tokens, k)


def scheduler_time(c: float, lookahead: int, sp: int, tokens: int, first_rejects: list[int]) -> float:
    """Virtual time at which the scheduler has committed ``tokens`` tokens."""
    reached: list[float] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = [0]

        def on_commit(_token: object) -> bool:
            done[0] += 1
            if done[0] == tokens:
                reached.append(loop.time())
            return False

        config = SchedulerConfig(mode="dsi", lookahead=lookahead, sp_degree=sp,
                                 max_new_tokens=tokens + (sp + 1) * lookahead + 5)  # no end effects before
        await Scheduler(FakeTarget(instances=sp, latency=1.0), ScriptedDrafter(c, first_rejects), config,
                        "s").run(PROMPT, on_commit)

    run_virtual(main)
    return reached[0]


def simulator_time(c: float, lookahead: int, sp: int, tokens: int, first_rejects: list[int]) -> float:
    """Time (target latencies) at which the simulator has committed ``tokens`` tokens."""
    draws = np.array(first_rejects + [10**9] * (tokens + 1), dtype=np.int64)
    return _dsi_run(c, lookahead, sp, tokens, draws)[2]


@pytest.mark.parametrize("c, lookahead, sp", [(0.1, 5, 4), (0.1, 3, 2), (0.25, 2, 3), (0.05, 4, 4), (0.5, 1, 2),
                                              (0.2, 3, 1)])
def test_the_scheduler_and_the_simulator_commit_at_the_same_times(c: float, lookahead: int, sp: int) -> None:
    rng = np.random.default_rng(int(c * 1000) + 17 * lookahead + sp)
    first_rejects = [int(k) for k in rng.geometric(0.25, size=200) - 1]  # a = 0.75
    for tokens in (8, 20, 45):
        sim = simulator_time(c, lookahead, sp, tokens, first_rejects)
        sched = scheduler_time(c, lookahead, sp, tokens, first_rejects)
        assert sched == pytest.approx(sim, abs=1e-6), (tokens, sched, sim)


# -- several requests sharing the targets --------------------------------------------------------


def scheduler_cluster(settings: ClusterSettings, specs: list[ClusterRequest]) -> list[list[tuple[float, bool]]]:
    """Per request (arrival order = age), its commits as (virtual time, an accepted draft), run by the
    real Scheduler over the real Placement."""
    def forward_time(window: WindowRequest) -> float:
        if settings.forward_time is None:
            return settings.target_latency
        request = int(window.session_id[1:])
        return settings.forward_time(request, window.first_position - len(PROMPT_OF(request)),
                                     len(window.token_ids) - window.first_position + 1)

    shared = PlacedTarget(settings.targets, forward_time)
    shared.placement.headroom = settings.headroom
    out: list[list[tuple[float, bool]]] = [[] for _ in specs]

    async def one(i: int, spec: ClusterRequest) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(spec.arrival)
        prompt = PROMPT_OF(i)
        ids: list[int] = []

        def on_commit(token: CommittedToken) -> bool:
            out[i].append((loop.time(), token.source is Source.DRAFT))
            ids.append(token.token_id)
            return False

        config = SchedulerConfig(mode=spec.mode, lookahead=settings.lookahead, sp_degree=settings.sp,
                                 max_new_tokens=spec.tokens)
        drafter = ScriptedDrafter(spec.drafter_latency, list(spec.first_rejects))
        await Scheduler(RequestTarget(shared, f"s{i}"), drafter, config, f"s{i}", request_seq=i).run(prompt, on_commit)
        assert ids == reference(prompt, spec.tokens)  # and the output is the target's, whatever the timing

    async def main() -> None:
        await asyncio.wait_for(asyncio.gather(*(one(i, spec) for i, spec in enumerate(specs))), 1e5)

    run_virtual(main)
    return out


def PROMPT_OF(request: int) -> list[int]:  # noqa: N802 - a constant's shape
    return [1, 2, 3 + request]


def jitter(scale: float) -> Callable[[int, int, int], float]:
    """Forward times 1 + up to ``scale``, a hash of the window: windows that start together (several
    instances handed over at once, by cancels or one request's dispatches) then finish apart. Which of
    two simultaneous events of different requests goes first is the event loop's choice, which
    asyncio leaves open; the simulator takes a fixed one, so scripts must not rely on it."""

    def forward(request: int, first: int, scored: int) -> float:
        return 1.0 + scale * (coin(first * 64 + scored, request) + 0.5)

    return forward


def cluster_script(seed: int, requests: int, modes: tuple[str, ...], acceptance: float, spread: float,
                   tokens: int = 40) -> list[ClusterRequest]:
    """Requests in arrival order with generic drafter latencies and arrival times (no two events of the
    script fall on the same instant by accident), and geometric first rejections."""
    rng = np.random.default_rng(seed)
    arrivals = np.sort(rng.uniform(0.0, spread, size=requests))
    return [
        ClusterRequest(
            arrival=float(arrivals[i]),
            tokens=tokens + int(rng.integers(0, 9)),
            mode=modes[i % len(modes)],
            drafter_latency=float(rng.uniform(0.04, 0.3)),
            first_rejects=[int(k) for k in rng.geometric(1.0 - acceptance, size=4 * tokens) - 1],
        )
        for i in range(requests)
    ]


def jittered(**kw: object) -> ClusterSettings:
    return ClusterSettings(forward_time=jitter(1e-3), **kw)  # type: ignore[arg-type]


CLUSTERS = [  # (settings, seed, requests, modes, acceptance, arrival spread, tokens)
    pytest.param(jittered(targets=4, lookahead=4), 1, 1, ("dsi",), 0.8, 0.0, 40, id="1-dsi"),
    pytest.param(jittered(targets=4, lookahead=4), 2, 4, ("dsi",), 0.8, 1.0, 40, id="4-dsi-a0.8"),
    pytest.param(jittered(targets=4, lookahead=3), 3, 8, ("dsi",), 0.5, 3.0, 40, id="8-dsi-a0.5"),
    pytest.param(jittered(targets=3, lookahead=4), 4, 12, ("dsi",), 0.8, 2.0, 40, id="12-dsi-3-targets"),
    pytest.param(jittered(targets=4, lookahead=4), 9, 16, ("dsi",), 0.8, 0.01, 128, id="16-dsi-at-once-128"),
    pytest.param(jittered(targets=4, lookahead=4, sp=2), 5, 6, ("dsi",), 0.7, 1.5, 40, id="6-dsi-sp2"),
    pytest.param(jittered(targets=4, lookahead=4, headroom=0), 6, 8, ("dsi",), 0.8, 1.0, 40, id="8-dsi-no-headroom"),
    pytest.param(jittered(targets=4, lookahead=4), 7, 9, ("dsi", "si", "nonsi"), 0.8, 2.0, 40, id="9-mixed-modes"),
    pytest.param(ClusterSettings(targets=2, lookahead=5, target_latency=0.04), 8, 6, ("si", "nonsi"), 0.6, 0.1, 40,
                 id="6-baselines"),
]


@pytest.mark.parametrize(("settings", "seed", "requests", "modes", "acceptance", "spread", "tokens"), CLUSTERS)
def test_several_requests_commit_the_same_tokens_at_the_same_times(
    settings: ClusterSettings, seed: int, requests: int, modes: tuple[str, ...], acceptance: float, spread: float,
    tokens: int,
) -> None:
    specs = cluster_script(seed, requests, modes, acceptance, spread, tokens)
    if settings.target_latency != 1.0:
        specs = [dataclasses.replace(s, drafter_latency=s.drafter_latency * settings.target_latency) for s in specs]
    simulated = simulate_cluster(settings, specs)
    # No two requests' events fall on one instant (their order would be the event loop's).
    assert [o.shared_instants for o in simulated] == [0] * requests
    scheduled = scheduler_cluster(settings, specs)
    for i, (sim, sched) in enumerate(zip(simulated, scheduled, strict=True)):
        assert len(sched) == len(sim.commit_times) == specs[i].tokens
        assert [accepted for _, accepted in sched] == sim.accepted, f"request {i}: other commits"
        assert [t for t, _ in sched] == pytest.approx(sim.commit_times, abs=1e-6), f"request {i}: other times"
