"""``dsi bench precision`` on one small cell (llama, float32, 2 prompts x 8 tokens) through a real
cluster: the result has the documented structure, and in float32 DSI, SI and non-SI agree token for
token, as they must."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsi.bench.precision import COMPARISONS, PrecisionSettings, run_precision, total_steps, write_outputs

pytestmark = [pytest.mark.integration]


def test_precision_float32_cell_agrees(tmp_path: Path) -> None:
    s = PrecisionSettings(archs=["llama"], dtypes=["float32"], prompts=2, new_tokens=8, repeats=1, targets=2,
                          out_dir=str(tmp_path))
    assert s.validate() == []
    steps: list[str] = []
    result = run_precision(s, steps.append)
    assert len(steps) == total_steps(s)  # every announced progress step happened
    paths = write_outputs(result, tmp_path)
    assert [p.name for p in paths] == ["precision.json", "precision.md"]
    data = json.loads(paths[0].read_text())

    assert data["machine"]["torch"] and data["machine"]["transformers"]
    assert data["settings"]["archs"] == ["llama"] and data["settings"]["dtypes"] == ["float32"]
    assert set(data["totals"]) == {"float32/greedy", "float32/seeded"}
    [cell] = data["cells"]
    assert (cell["arch"], cell["dtype"], cell["error"]) == ("llama", "float32", None)
    assert set(cell["rows"]) == {"greedy", "seeded"}
    for row, r in cell["rows"].items():
        assert r["prompts"] == 2 and set(r["differ"]) == set(COMPARISONS)
        # float32: the target's margins are far above the rounding, so no mode may differ.
        assert r["differ"] == dict.fromkeys(COMPARISONS, 0), (row, r["differ"])
        assert all(r["ms_per_token"][m] > 0 for m in ("nonsi", "si", "dsi"))
        assert r["dsi_max_windows_in_flight"] >= 1
        for p in r["per_prompt"]:
            assert len(p["tokens"]["nonsi"]) == 8
            assert p["tokens"]["si"] is None and p["tokens"]["dsi"] == [None] and p["tokens"]["hf"] is None
            assert (p["seed"] is None) == (row == "greedy")
    assert "| llama | float32 | greedy | 0/2 | 0/2 | 0/2 | 0/2 |" in paths[1].read_text()
