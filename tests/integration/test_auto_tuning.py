"""An orchestrator with --lookahead auto --sp-degree auto: the first requests run on the fallback
(lookahead 5, every target) while it measures; once it has measured the targets, the drafter and
the acceptance rate, requests report a lookahead and SP degree chosen from them, and the output is
still plain decoding's."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsi.client import Client
from tests.integration.procs import start_service

pytestmark = pytest.mark.integration


def test_auto_lookahead_and_sp_are_chosen_from_measurements(tiny_pair: tuple[Path, Path], log_dir: Path) -> None:
    model = str(tiny_pair[0])
    targets = [start_service("target", ["--model", model, "--threads", "1", "--emulate-latency-ms", "30:30"], log_dir)
               for _ in range(2)]
    drafter = start_service("drafter", ["--model", model, "--threads", "1", "--emulate-latency-ms", "3:3",
                                        "--oracle-acceptance", "0.8"], log_dir)
    orch = start_service("orchestrator", ["--targets", ",".join(t.address for t in targets), "--drafter",
                                          drafter.address, "--lookahead", "auto", "--sp-degree", "auto"], log_dir)
    try:
        with Client(orch.address, timeout=60) as client:
            prompt = "def fibonacci(n):"
            expected = client.generate(prompt, max_new_tokens=24, mode="nonsi", ignore_eos=True).token_ids
            runs = [client.generate(prompt, max_new_tokens=24, mode="dsi", ignore_eos=True) for _ in range(12)]
            assert client.info().get("default_lookahead", 0) == 0  # 0 = auto (omitted from the dict when 0)
    finally:
        for s in [orch, drafter, *targets]:
            s.stop()
    assert all(r.token_ids == expected for r in runs)
    first, last = runs[0].stats, runs[-1].stats
    assert not first.get("auto_tuned") and first["lookahead"] == 5  # the fallback while measuring
    assert last.get("auto_tuned") is True
    assert 1 <= last["lookahead"] <= 10 and 1 <= last["sp_degree"] <= 2
