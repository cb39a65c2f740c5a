"""Simulator: closed-form cases, Monte Carlo agreement, DSI never slower than SI or non-SI with
enough targets, determinism, validation, CLI and heatmap."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dsi.sim import (
    SimResult,
    SimSettings,
    best_lookahead,
    dsi_pipeline_bound,
    si_analytic_time_per_token,
    simulate,
    suggest,
)
from dsi.sim.cli import register
from dsi.sim.model import _dsi_run

pytestmark = pytest.mark.unit


def _sim(c: float, a: float, lookahead: int, sp: int, **kw: Any) -> SimResult:
    return simulate(SimSettings(drafter_latency=c, acceptance=a, lookahead=lookahead, sp=sp, **kw))


@pytest.mark.parametrize("c, lookahead", [(0.05, 1), (0.2, 4), (0.5, 3), (1.5, 2)])
def test_zero_acceptance_si_pays_drafts_and_dsi_runs_at_target_speed(c: float, lookahead: int) -> None:
    r = _sim(c, 0.0, lookahead, 4, runs=5)
    assert r.nonsi == 1.0
    assert r.si_analytic == pytest.approx(lookahead * c + 1.0)
    assert r.si == pytest.approx(lookahead * c + 1.0)
    # Window 0 of every epoch is the non-SI step, so a useless drafter costs nothing.
    assert r.dsi == pytest.approx(1.0, abs=1e-9)
    assert r.speedup_dsi_over_si == pytest.approx(lookahead * c + 1.0)


@pytest.mark.parametrize("c, lookahead", [(0.05, 5), (0.3, 2), (1.0, 1)])
def test_full_acceptance_si_commits_lookahead_plus_one_per_round(c: float, lookahead: int) -> None:
    r = _sim(c, 1.0, lookahead, 3, runs=2)
    expected = (lookahead * c + 1.0) / (lookahead + 1)
    assert r.si_analytic == pytest.approx(expected)
    assert r.si == pytest.approx(expected)
    assert r.dsi_std == pytest.approx(0.0, abs=1e-12)  # nothing random when a = 1


def test_full_acceptance_fast_drafter_many_targets_reaches_the_pipeline_bound() -> None:
    c, lookahead, tokens = 0.002, 4, 200
    r = _sim(c, 1.0, lookahead, 200, tokens=tokens, runs=2)
    bound = dsi_pipeline_bound(c, lookahead, tokens)
    # c per token plus one target latency to fill the pipeline, spread over the run.
    assert bound == pytest.approx((50 * 4 * c + 1.0) / 201)
    assert r.dsi == pytest.approx(bound, rel=1e-9)
    assert r.dsi < 0.01
    assert r.dsi < r.si / 10
    assert r.required_sp >= math.floor(1.0 / (lookahead * c))


def test_dsi_is_drafter_bound_when_targets_suffice() -> None:
    r = _sim(0.1, 1.0, 5, 7, tokens=400, runs=1)
    assert r.required_sp == 2
    assert r.dsi == pytest.approx(dsi_pipeline_bound(0.1, 5, 400))
    assert r.dsi == pytest.approx(0.1, abs=0.01)


def test_too_few_targets_throttle_dsi() -> None:
    few = _sim(0.01, 1.0, 2, 2, runs=1)
    many = _sim(0.01, 1.0, 2, 60, runs=1)
    # Window 0 plus the windows dispatched every 2 c before it completes at t = 1 (a completion
    # frees its target before a dispatch at the same instant).
    assert few.required_sp == many.required_sp == 50
    assert many.dsi < few.dsi / 5


@pytest.mark.parametrize("c, lookahead", [(0.1, 5), (0.03, 3), (0.07, 2), (0.3, 1), (0.45, 2)])
def test_required_sp_is_the_pipeline_depth(c: float, lookahead: int) -> None:
    # With L c <= 1: window 0 plus one window every L c until a target frees at t = 1.
    # (L c > 1 adds critical-path windows, so no closed form there.)
    r = _sim(c, 0.9, lookahead, 1, runs=3)
    assert r.required_sp == max(1, math.ceil(1.0 / (lookahead * c) - 1e-9))


def _scripted(c: float, lookahead: int, sp: int | None, tokens: int, first_rejects: list[int]) -> float:
    draws = np.array(first_rejects + [10**9] * tokens, dtype=np.int64)
    time_per_token, _, _ = _dsi_run(c, lookahead, sp, tokens, draws)
    return time_per_token * tokens


def test_scheduler_trace_rejection_cancels_and_restarts() -> None:
    # Epoch 0 (K = 2): window 0 commits position 0 at t=1 (draft 0 accepted as its bonus); window
    # [0, 5), dispatched at 0.5, rejects draft 2 at t=1.5: 3 tokens. Epoch 1 (K = 0) starts at 1.5;
    # its window 0 rejects draft 0 at t=2.5: the 4th token.
    assert _scripted(0.1, 5, 7, 4, [2, 0]) == pytest.approx(2.5)


def test_scheduler_trace_resync_when_bonus_draft_is_missing() -> None:
    # A drafter slower than the target: draft 0 is not ready when window 0 completes, so every
    # target token is committed at once (resync): exactly target speed.
    assert _scripted(2.0, 3, 4, 5, []) == pytest.approx(5.0)


def test_scheduler_trace_critical_path_window_with_fewer_than_lookahead_drafts() -> None:
    # c = 0.3, L = 5: at t=1 only drafts 0..2 exist. Window 0 commits position 0; nothing scores
    # position 1, so [1, 3) goes at once and commits 1..3 at t=2 (bonus 3: draft 3 came at 1.2); then
    # [4, 6) commits 4..6 at t=3.
    assert _scripted(0.3, 5, 7, 7, []) == pytest.approx(3.0)


def test_scheduler_trace_backpressure_one_target() -> None:
    # N = 1, L = 2, c = 0.1: the drafter stops (N + 1) L = 4 drafts ahead of the committed prefix
    # and resumes on commits. t=1: position 0 (bonus, draft 0 matches); a new critical window starts
    # at the first undecided position: [1, 3) dispatched; t=2: positions 1, 2 and 3 (bonus, draft 3
    # matches); only draft 4 is there (the drafter stopped at 5 drafts): the short window [4, 5)
    # goes at once; t=3: position 4 and 5 (bonus; draft 5 came at 2.1): 6 tokens in 3 latencies.
    assert _scripted(0.1, 2, 1, 6, []) == pytest.approx(3.0)


@pytest.mark.parametrize("c, a, lookahead", [(0.1, 0.8, 5), (0.3, 0.5, 3), (0.05, 0.95, 8)])
def test_monte_carlo_si_matches_closed_form(c: float, a: float, lookahead: int) -> None:
    r = _sim(c, a, lookahead, 2, runs=200, tokens=200)
    assert r.si_analytic == pytest.approx(si_analytic_time_per_token(c, a, lookahead))
    assert r.si == pytest.approx(r.si_analytic, rel=0.02)


@pytest.mark.parametrize("c", [0.05, 0.2, 0.5])
@pytest.mark.parametrize("a", [0.3, 0.8])
def test_dsi_not_slower_than_si_or_nonsi_with_enough_targets(c: float, a: float) -> None:
    for lookahead in (1, 3, 6):
        r = _sim(c, a, lookahead, 40, runs=20)
        assert r.required_sp <= 40
        noise = 3 * r.dsi_std / math.sqrt(20)
        assert r.dsi <= min(r.si_analytic, r.nonsi) + noise, (lookahead, r)


def test_dsi_beats_si_at_paper_like_setting() -> None:
    r = _sim(0.1, 0.8, 5, 7, runs=50)
    assert r.dsi < r.si_analytic < r.nonsi
    assert r.speedup_dsi_over_si > 1.1


def test_seeded_runs_are_deterministic_and_seeds_differ() -> None:
    a = _sim(0.2, 0.7, 3, 4, runs=10, seed=7)
    b = _sim(0.2, 0.7, 3, 4, runs=10, seed=7)
    c = _sim(0.2, 0.7, 3, 4, runs=10, seed=8)
    assert a.to_dict() == b.to_dict()
    assert a.dsi != c.dsi


def test_target_latency_scales_times_not_speedups() -> None:
    base = _sim(0.2, 0.7, 3, 4, runs=5)
    ms = _sim(0.2, 0.7, 3, 4, runs=5, target_latency=30.0)
    assert ms.dsi == pytest.approx(30.0 * base.dsi)
    assert ms.nonsi == 30.0
    assert ms.speedup_dsi_over_si == pytest.approx(base.speedup_dsi_over_si)


@pytest.mark.parametrize(
    "field, value",
    [
        ("drafter_latency", 0.0),
        ("drafter_latency", float("nan")),
        ("acceptance", 1.5),
        ("acceptance", -0.1),
        ("lookahead", 0),
        ("lookahead", 2.5),
        ("sp", 0),
        ("target_latency", -1.0),
        ("tokens", 0),
        ("runs", 0),
        ("seed", -1),
    ],
)
def test_validation_names_the_field(field: str, value: object) -> None:
    kw: dict[str, object] = {"drafter_latency": 0.1, "acceptance": 0.5, "lookahead": 2, "sp": 2}
    kw[field] = value
    with pytest.raises(ValueError, match=field):
        SimSettings(**kw)  # type: ignore[arg-type]


def test_best_lookahead_minimises_dsi_time() -> None:
    lookaheads = [1, 3, 8]
    best, result = best_lookahead(0.05, 0.95, 7, lookaheads, runs=5)
    assert best in lookaheads
    for other in lookaheads:
        assert result.dsi <= _sim(0.05, 0.95, other, 7, runs=5).dsi + 1e-12
    assert best > 1  # long windows pay off for a fast, accurate drafter


def test_suggest_picks_smallest_sp_within_tolerance() -> None:
    advice = suggest(0.1, 0.8, 6, lookaheads=[1, 2, 3, 5], runs=5)
    assert 1 <= advice.sp <= advice.best_sp <= 6
    assert advice.dsi_by_sp[advice.sp] <= advice.best_dsi * 1.02 + 1e-12
    assert all(advice.dsi_by_sp[n] > advice.best_dsi * 1.02 for n in range(1, advice.sp))
    assert advice.result.dsi == pytest.approx(advice.dsi_by_sp[advice.sp])
    assert advice.dsi_by_sp[1] > advice.best_dsi  # one target cannot overlap verifications
    with pytest.raises(ValueError, match="max_sp"):
        suggest(0.1, 0.8, 0)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dsi")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    rc: int = args.func(args)
    return rc


def test_cli_simulate_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "simulate",
        "--drafter-latency",
        "0.1",
        "--acceptance",
        "0.8",
        "--lookahead",
        "5",
        "--sp",
        "7",
        "--runs",
        "5",
        "--target-latency-ms",
        "30",
        "--json",
    ]
    assert _cli(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["unit"] == "ms/token"
    assert out["settings"]["sp"] == 7
    assert set(out["result"]) >= {
        "nonsi",
        "si",
        "si_analytic",
        "dsi",
        "dsi_std",
        "required_sp",
        "speedup_dsi_over_si",
        "speedup_dsi_over_nonsi",
        "speedup_si_over_nonsi",
    }
    assert out["result"]["nonsi"] == 30.0


def test_cli_reads_flags_from_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DSI_SIM_DRAFTER_LATENCY", "0.2")
    monkeypatch.setenv("DSI_SIM_ACCEPTANCE", "0")
    monkeypatch.setenv("DSI_SIM_LOOKAHEAD", "3")
    monkeypatch.setenv("DSI_SIM_SP", "2")
    assert _cli(["simulate", "--runs", "2"]) == 0
    out = capsys.readouterr().out
    assert "DSI (Monte Carlo)" in out and "1.6000" in out  # SI at a = 0: 3 * 0.2 + 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["simulate", "--drafter-latency", "0.1"], "--acceptance"),
        (
            ["simulate", "--drafter-latency", "0.1", "--acceptance", "1.5", "--lookahead", "2", "--sp", "2"],
            "--acceptance",
        ),
        (
            ["simulate", "--drafter-latency", "-1", "--acceptance", "0.5", "--lookahead", "2", "--sp", "2"],
            "--drafter-latency",
        ),
        (["simulate", "suggest", "--drafter-latency", "0.1", "--acceptance", "0.5"], "--max-sp"),
        (["simulate", "heatmap", "--out", "x.txt"], "--out"),
    ],
)
def test_cli_bad_input_exits_2_with_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        _cli(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_suggest_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "simulate",
        "suggest",
        "--drafter-latency",
        "0.1",
        "--acceptance",
        "0.8",
        "--max-sp",
        "3",
        "--runs",
        "3",
        "--lookaheads",
        "1,2,4",
        "--json",
    ]
    assert _cli(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["lookahead"] in (1, 2, 4)
    assert 1 <= out["sp"] <= 3
    assert set(out["result"]) >= {"dsi", "si_analytic", "required_sp"}


def test_heatmap_writes_png_and_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "heat.png"
    argv = [
        "simulate",
        "heatmap",
        "--out",
        str(png),
        "--sp",
        "3",
        "--runs",
        "3",
        "--tokens",
        "60",
        "--c-values",
        "0.05,0.5",
        "--a-values",
        "0.2,0.9",
        "--lookaheads",
        "1,3",
        "--json",
    ]
    assert _cli(argv) == 0
    grid = json.loads(capsys.readouterr().out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert grid["out_png"] == str(png)
    assert len(grid["dsi_over_si"]) == 2 and len(grid["dsi_over_si"][0]) == 2  # [a][c]
    # A slow, inaccurate drafter makes SI slower than non-SI; DSI never is.
    assert grid["si_over_nonsi"][0][1] > 1.0
    assert all(v <= 1.0 + 1e-9 for row in grid["dsi_over_nonsi"] for v in row)
    # c = 0.05 with L <= 3 keeps more than 3 windows in flight: those cells are marked.
    assert grid["exceeds_sp"][1][0] is True
    assert grid["exceeds_sp"][0][1] is False
