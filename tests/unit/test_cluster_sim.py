"""The multi-request simulator (``dsi.sim.cluster``) on cases with known answers. Its agreement with
the real scheduler and placement is ``test_conformance.py``."""

from __future__ import annotations

import numpy as np
import pytest

from dsi.sim.cluster import ClusterRequest, ClusterSettings, load_sweep, simulate_cluster
from dsi.sim.model import _dsi_run

pytestmark = pytest.mark.unit

NEVER = [1 << 40] * 500  # no draft is ever rejected


@pytest.mark.parametrize(("c", "lookahead", "sp"), [(0.1, 5, 4), (0.25, 2, 3), (0.0937, 4, 4), (0.2, 3, 1)])
def test_one_request_alone_is_the_papers_time_model(c: float, lookahead: int, sp: int) -> None:
    rng = np.random.default_rng(7 * lookahead + sp)
    first_rejects = [int(k) for k in rng.geometric(0.25, size=200) - 1]
    out = simulate_cluster(ClusterSettings(targets=sp, lookahead=lookahead),
                           [ClusterRequest(0.0, 80, "dsi", c, first_rejects)])[0]
    for tokens in (8, 20, 45):
        expected = _dsi_run(c, lookahead, sp, tokens, np.array(first_rejects + [10**9] * tokens))[2]
        assert out.commit_times[tokens - 1] == pytest.approx(expected, abs=1e-9)


def test_non_si_shares_the_targets_one_token_per_forward() -> None:
    # Two requests on four targets: each gets a token per forward.
    out = simulate_cluster(ClusterSettings(targets=4), [ClusterRequest(0.0, 10, "nonsi") for _ in range(2)])
    assert [o.commit_times for o in out] == [[float(i) for i in range(1, 11)]] * 2
    # Eight requests on four targets: four tokens per forward in all, first come first served.
    out = simulate_cluster(ClusterSettings(targets=4), [ClusterRequest(0.0, 10, "nonsi") for _ in range(8)])
    assert max(o.finished for o in out) == pytest.approx(20.0)
    assert sum(len(o.commit_times) for o in out) == 80
    assert sum(o.forwards for o in out) == 80


def test_si_rounds_take_lookahead_drafts_then_one_forward() -> None:
    c, lookahead = 0.1, 4
    out = simulate_cluster(ClusterSettings(targets=1, lookahead=lookahead),
                           [ClusterRequest(0.0, 15, "si", c, NEVER)])[0]
    # Every round: 4 drafts (0.4), then one forward (1.0) commits them and its bonus token.
    assert out.commit_times[4] == pytest.approx(1.4)
    assert out.commit_times[9] == pytest.approx(2.8)
    assert out.commit_times[14] == pytest.approx(4.2)
    assert out.forwards == 3 and all(out.accepted[i] == (i % 5 != 4) for i in range(15))


def test_a_critical_window_preempts_another_requests_speculation() -> None:
    """Two DSI requests on two targets: the first alone speculates on both; the second, arriving
    with no target spare, sends its first window full (2 drafts, 0.2) rather than window 0, and that
    critical window takes an instance from the first's speculation at once."""
    settings = ClusterSettings(targets=2, lookahead=2, headroom=0)
    alone = simulate_cluster(settings, [ClusterRequest(0.0, 30, "dsi", 0.1, NEVER)])[0]
    first, second = simulate_cluster(settings, [ClusterRequest(0.0, 30, "dsi", 0.1, NEVER),
                                                ClusterRequest(0.55, 30, "dsi", 0.1, NEVER)])
    assert first.preempted >= 1
    assert second.commit_times[:3] == pytest.approx([0.55 + 0.2 + 1.0] * 3)  # 2 drafts and the bonus
    assert first.finished > alone.finished  # the first request gave capacity up


def test_rejects_what_it_cannot_simulate() -> None:
    with pytest.raises(ValueError, match="mode"):
        ClusterRequest(0.0, 10, "fast")
    with pytest.raises(ValueError, match="invalid settings"):
        ClusterSettings(targets=0)


def test_load_sweep_baselines_and_dsi_alone() -> None:
    settings = ClusterSettings(targets=4, lookahead=4)
    points = load_sweep(settings, [0.8], [1, 8], drafter_latency=0.1, tokens=64, runs=2)
    by = {(p.concurrency, p.mode): p for p in points}
    assert len(points) == 6
    # Non-SI: one token per forward; as many tokens per latency as requests, up to the targets (at most
    # 4 at C = 8; less if the last requests finish with targets idle).
    assert by[(1, "nonsi")].tokens_per_time == pytest.approx(1.0)
    assert 3.5 < by[(8, "nonsi")].tokens_per_time <= 4.0
    assert by[(8, "nonsi")].forwards_per_token == pytest.approx(1.0)
    assert by[(1, "nonsi")].forwards_per_token == pytest.approx(1.0)
    # One request alone: DSI beats SI, which beats non-SI (a = 0.8, a fast drafter).
    assert by[(1, "dsi")].tokens_per_time > 1.2 * by[(1, "si")].tokens_per_time > 1.2
    assert by[(1, "dsi")].p50_latency < by[(1, "si")].p50_latency


def test_cli_simulate_load_json(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse
    import json

    from dsi.sim.cli import register

    parser = argparse.ArgumentParser(prog="dsi")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["simulate", "load", "--a-values", "0.8", "--concurrency", "1,2", "--runs", "1",
                              "--new-tokens", "32", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["acceptance"], r["concurrency"]) for r in out["rows"]] == [(0.8, 1), (0.8, 2)]
    assert set(out["rows"][0]["modes"]) == {"nonsi", "si", "dsi"}
    row = out["rows"][0]
    assert row["dsi_over_best_rate"] == pytest.approx(
        row["modes"]["dsi"]["tokens_per_time"] / max(row["modes"]["si"]["tokens_per_time"],
                                                     row["modes"]["nonsi"]["tokens_per_time"]))


def test_a_shared_drafter_serves_one_request_as_its_own_would() -> None:
    rng = np.random.default_rng(5)
    first_rejects = [int(k) for k in rng.geometric(0.3, size=100) - 1]
    own = simulate_cluster(ClusterSettings(targets=4), [ClusterRequest(0.0, 60, "dsi", 0.1, first_rejects)])[0]
    shared = simulate_cluster(ClusterSettings(targets=4, drafter="shared-age"),
                              [ClusterRequest(0.0, 60, "dsi", 0.1, first_rejects)])[0]
    assert shared.commit_times == pytest.approx(own.commit_times)


def test_a_shared_drafter_drafts_one_at_a_time_oldest_request_first() -> None:
    settings = ClusterSettings(targets=2, lookahead=2, drafter="shared-age")
    older, younger = simulate_cluster(settings, [ClusterRequest(0.0, 3, "si", 0.1, NEVER),
                                                 ClusterRequest(1e-3, 3, "si", 0.1, NEVER)])
    # The older request's 2 drafts at 0.1 and 0.2, then the younger's at 0.3 and 0.4; a forward each.
    assert older.commit_times == pytest.approx([1.2] * 3)
    assert younger.commit_times == pytest.approx([1.4] * 3)
    # Each with a drafter of its own, both draft at once.
    older, younger = simulate_cluster(ClusterSettings(targets=2, lookahead=2), [
        ClusterRequest(0.0, 3, "si", 0.1, NEVER), ClusterRequest(1e-3, 3, "si", 0.1, NEVER)])
    assert younger.commit_times == pytest.approx([1.2 + 1e-3] * 3)


def test_an_urgent_draft_preempts_a_background_one() -> None:
    """A DSI request alone drafts ahead of its critical window (background) from t = 0.4; an SI
    request arriving at 0.55 gets the drafter at once (the background draft begun at 0.5 is stopped):
    its draft at 0.65, its forward to 1.65."""
    dsi, si = simulate_cluster(ClusterSettings(targets=4, lookahead=4, headroom=0, drafter="shared-age"),
                               [ClusterRequest(0.0, 40, "dsi", 0.1, NEVER), ClusterRequest(0.55, 2, "si", 0.1, NEVER)])
    assert si.commit_times == pytest.approx([1.65, 1.65])
