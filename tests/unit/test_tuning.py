"""Automatic lookahead and SP degree: the estimates (decode windows only, drafter gaps, acceptance),
the grid the time model is run on, the fallback before there are measurements, the cache, and the
server flags."""

from __future__ import annotations

import pytest

from dsi.services.orchestrator.tuning import DECODE_TOKENS, MIN_SAMPLES, Choice, Tuner, grid_point
from dsi.sim.model import suggest

pytestmark = pytest.mark.unit


def _measured(tuner: Tuner, target_s: float, draft_s: float, acceptance: float) -> None:
    for _ in range(MIN_SAMPLES):
        tuner.estimates.window(target_s, computed_tokens=4)
        tuner.estimates.window(50 * target_s, computed_tokens=DECODE_TOKENS + 1)  # a prefill: ignored
        tuner.estimates.draft_gap(draft_s)
        tuner.estimates.request(accepted=int(100 * acceptance), verified=100)


def test_grid_points() -> None:
    c, a = grid_point(0.1, 0.8)
    assert grid_point(0.104, 0.81) == (c, a) and abs(c - 0.1) / 0.1 < 0.05 and a == 0.8
    assert grid_point(0.1, 0.8) != grid_point(0.125, 0.8)  # a 25% slower drafter is another point
    assert grid_point(1e-6, 1.0) == (grid_point(0.005, 0.95))  # clipped
    c, a = grid_point(0.37, 0.33)
    assert abs(c - 0.37) / 0.37 < 0.05 and a == 0.35


def test_before_measurements_the_fallback_stands() -> None:
    tuner = Tuner(max_lookahead=64, fallback_lookahead=5)
    choice = tuner.choose(targets=4)
    assert (choice.lookahead, choice.sp, choice.auto) == (5, 4, False)
    tuner.estimates.window(0.04, computed_tokens=4)  # one sample is not enough
    assert tuner.choose(targets=4).auto is False


def test_the_choice_is_the_time_models_for_the_measured_point(monkeypatch: pytest.MonkeyPatch) -> None:
    tuner = Tuner(max_lookahead=64, runs=20, tokens=64)
    _measured(tuner, target_s=0.040, draft_s=0.004, acceptance=0.8)
    assert tuner.estimates.target_s.value == pytest.approx(0.040)  # prefills did not count
    c, a = grid_point(0.004 / 0.040, 0.8)
    expected = suggest(c, a, 4, lookaheads=range(1, 11), runs=20, tokens=64)
    calls = []

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(args)
        return suggest(*args, **kwargs)

    monkeypatch.setattr("dsi.sim.model.suggest", counting)
    assert tuner.cached(targets=4) is None  # not simulated yet
    choice = tuner.choose(targets=4)
    assert (choice.lookahead, choice.sp, choice.auto) == (expected.lookahead, expected.sp, True)
    assert tuner.cached(targets=4) == choice and tuner.choose(targets=4) == choice
    assert len(calls) == 1  # simulated once per grid point and pool size
    # A much slower drafter moves the point: a new choice, with a shorter lookahead than a fast one's.
    slow = Tuner(max_lookahead=64, runs=20, tokens=64)
    _measured(slow, target_s=0.040, draft_s=0.030, acceptance=0.5)
    assert slow.choose(targets=4).lookahead <= choice.lookahead
    assert len(calls) == 2


def test_the_lookahead_never_exceeds_the_servers_limit() -> None:
    tuner = Tuner(max_lookahead=2, runs=10, tokens=64)
    _measured(tuner, target_s=0.040, draft_s=0.001, acceptance=0.95)  # would want a long lookahead
    assert tuner.choose(targets=2).lookahead <= 2


def test_auto_flags() -> None:
    import argparse

    from dsi.services.orchestrator.settings import add_arguments, settings_from_args
    from dsi.services.runtime.validation import AUTO_SP

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    s = settings_from_args(parser.parse_args(["--targets", "a:1", "--lookahead", "auto", "--sp-degree", "auto"]))
    assert (s.default_lookahead, s.default_sp_degree) == (0, AUTO_SP)
    s = settings_from_args(parser.parse_args(["--targets", "a:1", "--lookahead", "3", "--sp-degree", "2"]))
    assert (s.default_lookahead, s.default_sp_degree) == (3, 2)
    with pytest.raises(SystemExit):
        parser.parse_args(["--targets", "a:1", "--lookahead", "often"])


def test_si_gets_the_closed_forms_best_lookahead() -> None:
    from dsi.sim.model import si_analytic_time_per_token

    tuner = Tuner(max_lookahead=64)
    assert tuner.choose_si().auto is False
    _measured(tuner, target_s=0.040, draft_s=0.004, acceptance=0.8)
    c, a = grid_point(0.1, 0.8)
    best = min(range(1, 11), key=lambda n: si_analytic_time_per_token(c, a, n))
    assert tuner.choose_si() == Choice(best, 1, auto=True)


def test_a_new_point_uses_the_last_choice_until_it_is_simulated() -> None:
    tuner = Tuner(max_lookahead=64, runs=10, tokens=64)
    assert tuner.lookup(targets=4) == (Choice(5, 4, auto=False), False)  # no measurements: the fallback
    _measured(tuner, target_s=0.040, draft_s=0.004, acceptance=0.8)
    assert tuner.lookup(targets=4) == (None, True)  # the first point: the caller simulates it
    first = tuner.choose(targets=4)
    assert tuner.lookup(targets=4) == (first, False)
    for _ in range(40):  # the drafter got much slower: a new point of the grid
        tuner.estimates.draft_gap(0.030)
    assert tuner.lookup(targets=4) == (first, True)  # no waiting: the last choice, and simulate
    second = tuner.choose(targets=4)
    assert tuner.lookup(targets=4) == (second, False)


def test_jitter_at_a_grid_boundary_does_not_move_the_point() -> None:
    tuner = Tuner(max_lookahead=64)
    _measured(tuner, target_s=0.040, draft_s=0.004, acceptance=0.8)
    first = tuner.point()
    for gap in (0.0042, 0.0039, 0.0043, 0.0038) * 10:  # +-7%: within 1.5 grid steps
        tuner.estimates.draft_gap(gap)
        assert tuner.point() == first
    for _ in range(60):
        tuner.estimates.draft_gap(0.006)  # +50%: a new point
    assert tuner.point() != first


def test_with_a_fixed_sp_degree_the_lookahead_is_the_best_for_it() -> None:
    from dsi.sim.model import best_lookahead

    tuner = Tuner(max_lookahead=64, runs=10, tokens=64)
    _measured(tuner, target_s=0.040, draft_s=0.004, acceptance=0.8)
    c, a = grid_point(0.1, 0.8)
    expected, _ = best_lookahead(c, a, 4, range(1, 11), runs=10, tokens=64)
    assert tuner.choose(targets=4, sp=4) == Choice(expected, 4, auto=True)
    assert tuner.lookup(targets=4, sp=4) == (Choice(expected, 4, auto=True), False)
    assert tuner.lookup(targets=4) == (None, True)  # the auto-SP choice is another entry
