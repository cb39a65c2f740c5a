"""``dsi bench load`` on one small cell (2 targets, C in 1 and 2, SI and DSI, 12 tokens) through a
real cluster: the result has the documented structure and its figures are consistent with each
other and with the emulated latencies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsi.bench.load import LoadSettings, arrival_times, percentile, run_load, total_steps, write_outputs

pytestmark = [pytest.mark.integration]

TOKENS = 12


def test_percentile_and_arrivals() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 99) == pytest.approx(1.99)
    times = arrival_times(2.0, 200, seed=7)
    assert times[0] == 0.0 and times == sorted(times) and times == arrival_times(2.0, 200, seed=7)
    assert 60 < times[-1] < 140  # 199 gaps of mean 0.5 s


def test_bench_load_small_cell(tmp_path: Path) -> None:
    s = LoadSettings(targets=2, a_values=[0.8], target_ms=20.0, concurrency=[1, 2], repeats=1,
                     max_new_tokens=TOKENS, modes=["si", "dsi"], out_dir=str(tmp_path))
    assert s.validate() == []
    steps: list[str] = []
    result = run_load(s, steps.append)
    assert len(steps) == total_steps(s) == 1 + 2 * 2  # every announced progress step happened
    paths = write_outputs(result, tmp_path)
    assert [p.name for p in paths] == ["load.json", "load.md", "load.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    data = json.loads(paths[0].read_text())

    assert data["machine"]["torch"] and len(data["load_average_start"]) == 3
    [cell] = data["cells"]
    assert (cell["a"], cell["lookahead"], cell["sp_degree"]) == (0.8, 4, 2)
    assert [(lv["kind"], lv["concurrency"]) for lv in cell["levels"]] == [("closed", 1), ("closed", 2)]
    for level in cell["levels"]:
        c = level["concurrency"]
        assert set(level["modes"]) == {"si", "dsi"}
        for m in level["modes"].values():
            assert m["errors"] == 0
            assert m["new_tokens"] == c * TOKENS  # every request ran to max_new_tokens
            [rep] = m["reps"]
            assert rep["requests"] == c and len(rep["latency_s"]) == c
            assert m["tokens_per_s"] > 0
            # Tokens/s cannot beat what the slowest request's latency allows.
            assert m["tokens_per_s"] <= c * TOKENS / max(rep["latency_s"]) * 1.001
            assert m["latency_p99_s"] >= m["latency_p50_s"] > 0
            assert m["latency_p50_s"] >= m["ttft_p50_s"] > 0
            assert 0 < m["target_busy_fraction"] <= 1.0
            # Each committed token costs at most one completed forward, and with 4 drafts per window
            # at a = 0.8 SI needs well under one; every token is computed by some forward.
            assert 0 < m["target_forwards_per_token"] <= 1.0
            assert m["target_computed_tokens_per_token"] >= 1.0
            assert 0 < m["drafts_per_window"] <= s.lookahead
            assert 0 < m["acceptance_rate"] <= 1
            # The drafter's counters: one draft at a time, it cannot be busier than the run is long.
            assert 0 < m["drafter_busy_fraction"] <= 1.05
            assert m["drafter_preempted_per_token"] >= 0
        assert level["modes"]["si"]["target_forwards_per_token"] < 0.6
        # SI applies every window it sends: the drafts it verified were made (made >= verified).
        si = level["modes"]["si"]
        assert si["drafter_drafts_per_token"] >= si["drafts_per_window"] * si["windows_per_token"] * 0.99 > 0
        assert level["dsi_over_si_tokens_per_s"] > 0 and level["dsi_over_si_tokens_per_s_paired"] > 0
        assert "tokens_pass" not in level  # no non-SI: no criteria
    assert "| C=1 | 0.8 |" in paths[1].read_text()
