"""Cancelling a request's scheduler run (asyncio cancel of ``Scheduler.run``) mid-request: the
CancelledError reaches the caller, the windows in flight were cancelled on the target before it did,
the drafter streams are cancelled, and nothing of the request runs afterwards."""

from __future__ import annotations

import asyncio

import pytest

from dsi.services.orchestrator.scheduler import CommittedToken, Scheduler, SchedulerConfig
from tests.unit.fakes import FakeDrafter, FakeTarget, reference, run_virtual

pytestmark = pytest.mark.unit

PROMPT = [1, 2, 3]
N = 200  # far more than fits before the cancel: the request is always cancelled mid-way


def _cancel_at(mode: str, at: float, acceptance: float = 0.7) -> dict[str, object]:
    """Run a request on the virtual clock, cancel it ``at`` seconds in, then let 30 s more pass."""
    target = FakeTarget(instances=3, latency=1.0)
    drafter = FakeDrafter(latency=0.1, acceptance=acceptance)
    out: list[CommittedToken] = []

    async def main() -> dict[str, object]:
        sched = Scheduler(target, drafter, SchedulerConfig(mode=mode, lookahead=3, max_new_tokens=N), "s1")
        task = asyncio.ensure_future(sched.run(PROMPT, lambda tok: out.append(tok) or False))
        await asyncio.sleep(at)
        assert not task.done()
        in_flight = len(target.calls) - target.completed  # windows started and not finished
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()
        at_cancel = {
            "calls": len(target.calls),
            "completed": target.completed,
            "cancelled": target.cancelled,
            "opened": drafter.opened,
            "produced": drafter.produced,
            "committed": len(out),
            "epochs": sched.stats.epochs,
        }
        await asyncio.sleep(30.0)  # virtual: many target latencies
        after = {
            "calls": len(target.calls),
            "completed": target.completed,
            "cancelled": target.cancelled,
            "opened": drafter.opened,
            "produced": drafter.produced,
            "committed": len(out),
            "epochs": sched.stats.epochs,
        }
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return {"in_flight": in_flight, "at_cancel": at_cancel, "after": after, "left_running": len(others),
                "streams": list(drafter.streams), "stats": sched.stats}

    result = run_virtual(main)
    assert isinstance(result, dict)
    result["out"] = [t.token_id for t in out]
    return result


@pytest.mark.parametrize("mode", ["dsi", "si", "nonsi"])
@pytest.mark.parametrize("at", [0.05, 0.25, 0.9, 2.55, 4.3])
def test_cancelling_the_run_stops_every_call_of_the_request(mode: str, at: float) -> None:
    r = _cancel_at(mode, at)
    at_cancel, after = r["at_cancel"], r["after"]
    assert isinstance(at_cancel, dict) and isinstance(after, dict)
    # Nothing of the request runs after its cancel: no window, no draft, no stream, no commit.
    assert after == at_cancel
    assert r["left_running"] == 0
    # By the time the cancel reached the caller every window the target started was finished:
    # completed, or cancelled on the target (a real cancel, not left to run out).
    assert at_cancel["completed"] + at_cancel["cancelled"] == at_cancel["calls"]
    if r["in_flight"]:
        assert at_cancel["cancelled"] >= 1
    # Every drafter stream the request opened was cancelled (or had used all its credit).
    streams = r["streams"]
    assert isinstance(streams, list)
    assert all(s.cancelled or (s.grants_ended and s.credit == 0) for s in streams)
    # What was committed before the cancel is a prefix of the target's output.
    out = r["out"]
    assert isinstance(out, list) and len(out) < N
    assert out == reference(PROMPT, len(out))


def test_a_cancel_while_windows_are_in_flight_cancels_them_on_the_target() -> None:
    """DSI with 3 instances and a fast drafter: 2.55 s in, speculative windows are running."""
    r = _cancel_at("dsi", 2.55, acceptance=1.0)
    at_cancel = r["at_cancel"]
    assert isinstance(at_cancel, dict)
    assert r["in_flight"] >= 2
    assert at_cancel["cancelled"] == r["in_flight"]
    stats = r["stats"]
    assert stats.windows_cancelled == at_cancel["cancelled"]  # type: ignore[attr-defined]
    assert stats.wasted_target_s > 0  # type: ignore[attr-defined]  # the cancelled windows held targets
