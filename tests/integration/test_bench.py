"""``dsi bench --quick`` runs end to end on real processes and writes a complete JSON result: every
cell has every mode with positive timings, the simulator's prediction and both criteria, and every
derived number (medians, speedups, ratios, verdicts, summary, the printed table) follows from the
measured times."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODES = ("nonsi", "si", "dsi")


def check_cell_is_consistent(cell: dict[str, Any]) -> None:
    """A cell's summaries, speedups and verdicts follow from its measured times (each mode's
    per-prompt ms/token) and the simulator's prediction, and each mode ran as that mode runs."""
    m = cell["modes"]
    for mode in MODES:
        per_prompt = m[mode]["per_prompt_ms_per_token"]
        assert m[mode]["ms_per_token"] == pytest.approx(statistics.median(per_prompt))
        assert m[mode]["noise_ms"] == pytest.approx((max(per_prompt) - min(per_prompt)) / 2)
    # Non-SI: one window per token, nothing drafted or cancelled; SI: one window at a time.
    assert m["nonsi"]["windows_dispatched"] == 16 and m["nonsi"]["epochs"] == 16
    assert m["nonsi"]["windows_cancelled"] == 0 and m["nonsi"]["acceptance_rate"] == 0
    assert m["nonsi"]["max_windows_in_flight"] == 1 and m["si"]["max_windows_in_flight"] == 1
    assert m["si"]["windows_cancelled"] == 0
    # SI and DSI verified drafts (the oracle drafter gets some accepted at a = 0.6 and 0.95).
    assert m["si"]["acceptance_rate"] > 0 and m["dsi"]["acceptance_rate"] > 0
    assert m["si"]["windows_dispatched"] < 16 and m["dsi"]["max_windows_in_flight"] >= 1
    nonsi, si, dsi = (m[k]["ms_per_token"] for k in MODES)
    p = cell["predicted"]
    assert cell["speedup_dsi_over_si"] == pytest.approx(si / dsi)
    assert cell["speedup_dsi_over_nonsi"] == pytest.approx(nonsi / dsi)
    assert cell["speedup_si_over_nonsi"] == pytest.approx(nonsi / si)
    assert cell["ratio_speedup_dsi_over_si"] == pytest.approx(si / dsi / p["speedup_dsi_over_si"])
    assert cell["ratio_speedup_dsi_over_nonsi"] == pytest.approx(nonsi / dsi / p["speedup_dsi_over_nonsi"])
    assert cell["criteria_apply"] == (cell["sp"] >= 2 and p["dsi_ms"] < min(p["si_ms"], p["nonsi_ms"]))
    fastest = cell["dsi_fastest"]
    best_other = "si" if si <= nonsi else "nonsi"
    noise = max(m["dsi"]["noise_ms"], m[best_other]["noise_ms"])
    assert (fastest["best_other"], fastest["dsi_ms"], fastest["best_other_ms"]) == (best_other, dsi, min(si, nonsi))
    assert fastest["noise_ms"] == pytest.approx(noise)
    assert fastest["pass"] is (dsi <= min(si, nonsi) + noise)
    vs_sim = cell["dsi_vs_sim"]
    assert vs_sim["measured"] == pytest.approx(si / dsi) and vs_sim["predicted"] == p["speedup_dsi_over_si"]
    assert vs_sim["pass"] is (si / dsi >= vs_sim["threshold"] * p["speedup_dsi_over_si"])
    assert vs_sim["threshold"] == 0.9


def test_bench_quick_writes_complete_json(tmp_path: Path) -> None:
    # --quick's 2x2 grid is trimmed to one drafter latency (2 cells) and the real part is skipped:
    # each cell starts its own cluster, which takes ~15-20 s on a 2-core machine.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "dsi.cli",
        "bench",
        "--quick",
        "--c-values",
        "0.2",
        "--targets",
        "2",
        "--target-ms",
        "20",
        "--max-new-tokens",
        "16",
        "--skip-real",
        "--auto-lookahead",
        "--out-dir",
        str(tmp_path),
    ]
    env["COLUMNS"] = "300"  # the table's rows stay on one line each
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "oracle drafter (controlled acceptance, benchmark only)" in proc.stdout

    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["machine"]["cpu_count"] >= 1 and result["machine"]["torch"]
    cells = result["emulated"]
    assert [(c["c"], c["a"]) for c in cells] == [(0.2, 0.6), (0.2, 0.95)]
    for cell in cells:
        assert cell["lookahead"] >= 1 and cell["sp"] == 2
        for mode in MODES:
            m = cell["modes"][mode]
            assert m["ms_per_token"] > 0 and m["noise_ms"] >= 0
            assert len(m["per_prompt_ms_per_token"]) == 2
            assert all(n == 16 for n in m["new_tokens"])
            # The emulated target latency is a floor: non-SI cannot beat one forward per token.
            if mode == "nonsi":
                assert m["ms_per_token"] >= 20.0
        check_cell_is_consistent(cell)
        p = cell["predicted"]
        assert p["nonsi_ms"] == pytest.approx(20.0)
        assert 0 < p["dsi_ms"] < p["nonsi_ms"]
        assert p["speedup_dsi_over_si"] > 0
        # The table shows this cell's numbers.
        m = cell["modes"]
        # (Two cells may share one mode's figures: the row is the one that shows all of them.)
        wanted = [f"{m[mode]['ms_per_token']:.1f}±{m[mode]['noise_ms']:.1f}" for mode in MODES]
        wanted += [f"{cell['speedup_dsi_over_si']:.2f}", f"{cell['ratio_speedup_dsi_over_si']:.2f}"]
        assert any(all(w in line for w in wanted) for line in proc.stdout.splitlines()), wanted
    overhead = result["overhead"]
    assert overhead["ms_per_window_by_cell"] == [c["overhead_ms_per_window"] for c in cells]
    assert overhead["ms_per_window_median"] == pytest.approx(statistics.median(overhead["ms_per_window_by_cell"]))
    assert overhead["ms_per_window_median"] > 0
    assert overhead["cancel"]["cancel_to_free_ms"] < 200.0  # less than the cancelled forward
    checked = [c for c in cells if c["criteria_apply"]]
    assert result["summary"] == {
        "cells": 2,
        "cells_checked": len(checked),
        "dsi_fastest_pass": sum(c["dsi_fastest"]["pass"] for c in checked),
        "dsi_vs_sim_pass": sum(c["dsi_vs_sim"]["pass"] for c in checked),
        "all_pass": all(c["dsi_fastest"]["pass"] and c["dsi_vs_sim"]["pass"] for c in checked),
        "auto_lookahead_pass": sum(c["auto"]["pass"] for c in cells),
        "auto_lookahead_cells": 2,
    }
    # --auto-lookahead: DSI with the server's choice, next to the fixed best lookahead, per cell.
    for cell in cells:
        auto = cell["auto"]
        assert len(auto["per_prompt_ms_per_token"]) == 2 and all(n == 16 for n in auto["new_tokens"])
        assert all(auto["auto_tuned"]) and 1 <= auto["lookahead_chosen"] <= 10
        assert auto["ratio_to_best_fixed"] == pytest.approx(auto["ms_per_token"] / cell["modes"]["dsi"]["ms_per_token"])
    assert "Automatic lookahead" in proc.stdout
    assert f"criteria checked on {len(checked)}/2 cells" in proc.stdout
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert (tmp_path / "overhead.png").stat().st_size > 0
