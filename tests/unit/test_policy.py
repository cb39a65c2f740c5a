"""DSI's load-aware rules (services/orchestrator/policy.py) on scripted snapshots."""

from __future__ import annotations

import pytest

from dsi.services.orchestrator.policy import (
    EpochState,
    Load,
    RunningWindow,
    preemption_victims,
    urgent_until,
    windows_to_dispatch,
    withdraw_yielding,
    yielding_window,
)

pytestmark = pytest.mark.unit

L, SP = 4, 4
BUSY = Load(spare_targets=0)
UNLOADED = Load(spare_targets=1 << 30)  # every target idle


def state(**kw: object) -> EpochState:
    base: dict[str, object] = dict(
        drafts=0, decided=0, dispatched_end=0, windows=0, applied=0, in_flight=0, budget=100, more_drafts=True
    )
    base.update(kw)
    return EpochState(**base)  # type: ignore[arg-type]


def test_idle_targets_get_window_zero_at_once() -> None:
    assert windows_to_dispatch(state(), L, SP, UNLOADED) == [(0, 0)]
    assert windows_to_dispatch(state(), L, SP, Load(spare_targets=1)) == [(0, 0)]


def test_under_load_window_zero_waits_for_a_full_window() -> None:
    assert windows_to_dispatch(state(), L, SP, BUSY) == []
    assert windows_to_dispatch(state(drafts=3), L, SP, BUSY) == []
    assert windows_to_dispatch(state(drafts=4), L, SP, BUSY) == [(0, 4)]


def test_without_more_drafts_the_critical_window_goes_with_what_there_is() -> None:
    """A dead drafter (or one at its context limit) must not leave the request waiting."""
    assert windows_to_dispatch(state(more_drafts=False), L, SP, BUSY) == [(0, 0)]
    assert windows_to_dispatch(state(drafts=2, more_drafts=False), L, SP, BUSY) == [(0, 2)]
    # The last drafts the budget allows complete a window too.
    assert windows_to_dispatch(state(drafts=5, budget=2), L, SP, BUSY) == [(0, 2)]


def test_short_critical_windows_only_onto_idle_targets() -> None:
    idle_critical = state(drafts=6, decided=5, dispatched_end=4, windows=2, applied=2)
    assert windows_to_dispatch(idle_critical, L, SP, Load(spare_targets=1)) == [(5, 6)]
    assert windows_to_dispatch(idle_critical, L, SP, BUSY) == []


def test_short_critical_windows_leave_an_idle_target_for_every_other_request() -> None:
    """Window 0 and short critical windows go out only while more targets are spare than other
    requests are under way: each of those wants a target soon, and a short window (not preemptible:
    it is critical) would make it wait. A full window goes out regardless."""
    idle_critical = state(drafts=6, decided=5, dispatched_end=4, windows=2, applied=2)
    assert windows_to_dispatch(state(), L, SP, Load(spare_targets=3, others=2)) == [(0, 0)]
    assert windows_to_dispatch(state(), L, SP, Load(spare_targets=2, others=2)) == []
    assert windows_to_dispatch(idle_critical, L, SP, Load(spare_targets=2, others=1)) == [(5, 6)]
    assert windows_to_dispatch(idle_critical, L, SP, Load(spare_targets=1, others=1)) == []
    assert windows_to_dispatch(state(drafts=4), L, SP, Load(spare_targets=0, others=15)) == [(0, 4)]
    # Without more drafts to wait for, the critical window goes with what there is, load or not.
    assert windows_to_dispatch(state(drafts=2, more_drafts=False), L, SP, Load(0, others=15)) == [(0, 2)]


def test_a_request_confined_to_one_instance_sends_only_full_windows() -> None:
    """Confined to the one instance holding its long prompt (its prefill budget spent), a request
    sends no zero-draft or short window: it would occupy the instance the full window needs next.
    Confined to two, or to none, the short windows go out as before; with no more drafts coming, the
    critical window goes with what there is."""
    idle_critical = state(drafts=6, decided=5, dispatched_end=4, windows=2, applied=2)
    alone = Load(spare_targets=1, others=0, confined=1)
    assert windows_to_dispatch(state(), L, SP, alone) == []
    assert windows_to_dispatch(idle_critical, L, SP, alone) == []
    assert windows_to_dispatch(state(drafts=4), L, SP, alone) == [(0, 4)]
    assert windows_to_dispatch(state(drafts=2, more_drafts=False), L, SP, alone) == [(0, 2)]
    assert windows_to_dispatch(state(), L, SP, Load(spare_targets=1, confined=2)) == [(0, 0)]
    assert windows_to_dispatch(idle_critical, L, SP, Load(spare_targets=1, confined=None)) == [(5, 6)]


def test_speculative_windows_take_only_spare_targets() -> None:
    # Window 0 computes (the critical one); 9 drafts are there.
    busy_critical = state(drafts=9, windows=1, in_flight=1)
    assert windows_to_dispatch(busy_critical, L, SP, UNLOADED) == [(0, 4), (4, 8)]
    assert windows_to_dispatch(busy_critical, L, SP, Load(spare_targets=1)) == [(0, 4)]
    assert windows_to_dispatch(busy_critical, L, SP, BUSY) == [(0, 4)]  # the one after window 0, see below
    full_critical = state(drafts=13, dispatched_end=4, windows=1, in_flight=1, critical_start=0, critical_end=4)
    assert windows_to_dispatch(full_critical, L, SP, Load(spare_targets=1)) == [(4, 8)]
    assert windows_to_dispatch(full_critical, L, SP, BUSY) == []
    # Never more than SP in flight, spare or not.
    assert windows_to_dispatch(busy_critical, L, 2, UNLOADED) == [(0, 4)]


def test_a_critical_window_goes_out_under_load_and_speculation_after_it_needs_spare() -> None:
    critical_idle = state(drafts=12, windows=0)
    assert windows_to_dispatch(critical_idle, L, SP, BUSY) == [(0, 4)]
    assert windows_to_dispatch(critical_idle, L, SP, Load(spare_targets=2)) == [(0, 4), (4, 8)]


def test_urgent_drafts_are_those_a_full_window_at_the_critical_position_needs() -> None:
    # No window computing: the next L drafts from the decided position.
    assert urgent_until(state(decided=3), L) == 7
    # A full critical window computing: its drafts exist; everything after is speculation.
    assert urgent_until(state(windows=2, applied=1, critical_start=4, critical_end=8), L) == 8
    # Window 0 (no drafts) or a short window computing: the drafts that fill it are still needed.
    assert urgent_until(state(windows=1, critical_start=0, critical_end=0), L) == 4
    assert urgent_until(state(windows=1, critical_start=2, critical_end=3), L) == 6


def test_the_full_window_after_a_short_critical_one_does_not_wait_for_spare() -> None:
    """Window 0 (or a short critical window) computes; the full window after it is what the request
    needs next, so it goes out even with no spare target, but only that one."""
    after_window_zero = state(drafts=12, windows=1, in_flight=1, critical_start=0, critical_end=0)
    assert windows_to_dispatch(after_window_zero, L, SP, BUSY) == [(0, 4)]
    after_short = state(drafts=12, decided=3, dispatched_end=3, windows=2, applied=1, in_flight=1,
                        critical_start=1, critical_end=3)
    assert windows_to_dispatch(after_short, L, SP, BUSY) == [(3, 7)]
    assert windows_to_dispatch(after_short, L, SP, Load(spare_targets=1)) == [(3, 7)]  # it takes the spare one
    assert windows_to_dispatch(after_short, L, SP, Load(spare_targets=2)) == [(3, 7), (7, 11)]


def test_a_new_critical_window_starts_at_the_first_undecided_position() -> None:
    """Once every window is applied, the last one's bonus position is decided: the next critical
    window scores from the position after it instead of scoring that one again (a full window then
    commits up to L + 1 tokens, as an SI round does)."""
    applied_all = state(drafts=9, decided=5, dispatched_end=4, windows=2, applied=2)
    assert windows_to_dispatch(applied_all, L, SP, BUSY) == [(5, 9)]
    assert windows_to_dispatch(state(drafts=8, decided=5, dispatched_end=4, windows=2, applied=2), L, SP, BUSY) == []
    # With a target idle the short window goes at once, from the first undecided position; with
    # no draft there yet it is the zero-draft (non-SI) step.
    assert windows_to_dispatch(state(drafts=7, decided=5, dispatched_end=4, windows=2, applied=2), L, SP,
                               Load(spare_targets=1)) == [(5, 7)]
    assert windows_to_dispatch(state(drafts=5, decided=5, dispatched_end=4, windows=2, applied=2), L, SP,
                               Load(spare_targets=1)) == [(5, 5)]
    # The last position to generate: no draft will come for it, the window goes without drafts.
    assert windows_to_dispatch(state(drafts=5, decided=5, dispatched_end=4, windows=2, applied=2, budget=5), L, SP,
                               BUSY) == [(5, 5)]


def test_a_short_critical_window_held_back_for_others_goes_out_as_a_yielding_one() -> None:
    """Where the rules hold window 0 or a short critical window back for the other requests under
    way, it may still go onto a spare instance as a yielding window (preempted first, then dropped),
    over the drafts there are; never without a spare instance, never when a full window could go
    (the rules send that one), never while a window is in flight, never confined to one instance."""
    crowded = Load(spare_targets=1, others=15)
    idle_critical = state(drafts=6, decided=5, dispatched_end=4, windows=2, applied=2)
    assert windows_to_dispatch(state(), L, SP, crowded) == []
    assert yielding_window(state(), L, crowded) == (0, 0)
    assert yielding_window(state(drafts=3), L, crowded) == (0, 3)
    assert yielding_window(idle_critical, L, crowded) == (5, 6)
    assert yielding_window(state(), L, Load(spare_targets=0, others=15)) is None
    assert yielding_window(state(drafts=4), L, crowded) is None  # a full window: windows_to_dispatch's
    in_flight = state(drafts=2, windows=1, applied=0, in_flight=1, critical_start=0, critical_end=0)
    assert yielding_window(in_flight, L, crowded) is None
    assert yielding_window(state(), L, Load(spare_targets=1, confined=1)) is None


def test_a_yielding_window_is_withdrawn_once_its_full_window_can_go() -> None:
    computing = dict(windows=1, applied=0, in_flight=1, critical_start=0, critical_end=0)
    assert not withdraw_yielding(state(drafts=3, **computing), L)
    assert withdraw_yielding(state(drafts=4, **computing), L)
    # No more drafts to come: withdrawn for a window over more drafts than it carries, not otherwise.
    assert withdraw_yielding(state(drafts=2, more_drafts=False, **computing), L)
    short = dict(computing, critical_end=2)
    assert not withdraw_yielding(state(drafts=2, more_drafts=False, **short), L)
    assert not withdraw_yielding(state(drafts=3, **short), L)
    assert withdraw_yielding(state(drafts=4, **short), L)


def test_yielding_windows_are_preempted_before_any_speculation() -> None:
    running = [
        RunningWindow(rank=0, request_seq=1, started=0.0, preempted=False),  # critical: never
        RunningWindow(rank=3, request_seq=9, started=2.0, preempted=False),
        RunningWindow(rank=0, request_seq=0, started=1.0, preempted=False, yields=True),
        RunningWindow(rank=1, request_seq=2, started=3.0, preempted=False),
    ]
    assert preemption_victims(1, running) == [2]
    assert preemption_victims(3, running) == [2, 1, 3]
    assert preemption_victims(1, [*running[:2], RunningWindow(0, 0, 1.0, True, yields=True)]) == []
