"""Conformance: the real scheduler, run on a virtual clock against scripted fakes, and the simulator
(``dsi.sim.model``), run on the same script, commit at the same times.

The script: target latency 1, drafter latency c per draft, N target instances, lookahead L, and per
epoch the index K of its first rejected draft (the simulator's whole randomness). The scheduler's
drafter proposes the target's token except at index K of each epoch (counted from the epoch's first
position), so both see the same acceptances. For one request alone the load-aware rules in
``policy.py`` reduce to the simulator's rules (every idle target is spare), so the time at which the
run has committed ``tokens`` tokens must be equal."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from dsi.services.orchestrator.scheduler import Draft, Scheduler, SchedulerConfig
from dsi.sim.model import _dsi_run
from tests.unit.fakes import VOCAB, CreditStream, FakeTarget, run_virtual, target_token

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
