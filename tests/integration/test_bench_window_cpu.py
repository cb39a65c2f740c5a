"""``dsi bench window-cpu`` on two short lengths: it runs both code paths (incremental and full
Verify) and writes the documented structure; the timing figures themselves are benchmark output,
not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration]


def test_window_cpu_bench_writes_its_table(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dsi.cli", "bench", "window-cpu", "--lengths", "20,300", "--windows", "100",
         "--repeats", "1", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "window_cpu.json").read_text())
    assert data["settings"]["lengths"] == [20, 300] and data["machine"]["torch"]
    assert [(r["length"], r["mode"]) for r in data["rows"]] == [
        (20, "incremental"), (20, "full"), (300, "incremental"), (300, "full")]
    for r in data["rows"]:
        assert r["orchestrator_ms"] > 0 and r["target_ms"] > 0
    assert "| 300 | incremental |" in (tmp_path / "window_cpu.md").read_text()
    assert "CPU per Verify window" in proc.stdout


def test_window_cpu_bench_rejects_bad_settings(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dsi.cli", "bench", "window-cpu", "--windows", "3", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "--windows must be >= 50" in proc.stderr
