"""``dsi bench --quick`` runs end to end on real processes and writes a complete JSON result: every
cell has every mode with positive timings, the simulator's prediction and both criteria."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODES = ("nonsi", "si", "dsi")


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
        "--out-dir",
        str(tmp_path),
    ]
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
        assert cell["modes"]["dsi"]["max_windows_in_flight"] >= 1
        p = cell["predicted"]
        assert p["nonsi_ms"] == pytest.approx(20.0)
        assert 0 < p["dsi_ms"] < p["nonsi_ms"]
        assert p["speedup_dsi_over_si"] > 0
        assert cell["ratio_speedup_dsi_over_si"] > 0
        assert isinstance(cell["dsi_fastest"]["pass"], bool) and isinstance(cell["dsi_vs_sim"]["pass"], bool)
    assert result["overhead"]["ms_per_window_median"] > 0
    assert result["overhead"]["cancel"]["cancel_to_free_ms"] < 200.0  # less than the cancelled forward
    assert result["summary"]["cells"] == 2
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert (tmp_path / "overhead.png").stat().st_size > 0
