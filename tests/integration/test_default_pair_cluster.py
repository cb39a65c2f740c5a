"""`dsi up` with no model flags serves the built-in trained pair shipped in dsi/pretrained."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import dsi
from dsi.client import Client
from tests.integration.procs import greedy_reference

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PRETRAINED = Path(dsi.__file__).parent / "pretrained"


def test_dsi_up_without_model_flags_serves_the_trained_pair(tmp_path: Path) -> None:
    assert (PRETRAINED / "target" / "model.safetensors").is_file(), "the trained pair must ship in the package"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsi.cli", "up", "--targets", "2", "--port", "0", "--log-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "DSI_CACHE_DIR": str(tmp_path / "cache")},
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("orchestrator listening on "), (line, proc.stderr.read() if proc.stderr else "")
        with Client(line.split()[-1], timeout=120) as client:
            info = client.info()
            assert Path(info["target_model"]["model"]).resolve() == (PRETRAINED / "target").resolve()
            assert Path(info["drafter_model"]["model"]).resolve() == (PRETRAINED / "drafter").resolve()
            dsi_out = client.generate("def fibonacci(n):", max_new_tokens=32, mode="dsi")
            nonsi_out = client.generate("def fibonacci(n):", max_new_tokens=32, mode="nonsi")
        # The trained target's own greedy continuation (transformers, in-process), up to its EOS.
        tok = AutoTokenizer.from_pretrained(str(PRETRAINED / "target"))
        prompt_ids = tok("def fibonacci(n):", add_special_tokens=False)["input_ids"]
        expected = greedy_reference(PRETRAINED / "target", prompt_ids, 32)
        eos = tok.eos_token_id
        if eos in expected:
            expected = expected[: expected.index(eos) + 1]
        assert nonsi_out.token_ids == expected
        assert dsi_out.token_ids == nonsi_out.token_ids
        assert dsi_out.text == nonsi_out.text and dsi_out.text.strip()
        assert dsi_out.stats["drafts_accepted"] > 0  # a real drafter: it gets tokens accepted
        assert not (tmp_path / "cache" / "random-pair-v1").exists()  # no fallback pair was built
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
