"""Under load, with the load-aware machinery at work (speculation only on spare targets, critical
windows preempting speculative ones on the targets, urgent drafts preempting background ones on the
drafter, incremental Verify), DSI's output is SI's and non-SI's token for token, greedy and seeded."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dsi.client import AsyncClient
from dsi.v1 import drafter_pb2, drafter_pb2_grpc
from tests.integration.procs import Service, start_service

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPTS = ["def fibonacci(n):", "import os\n", "class Foo:", "for i in range(10):", "return x + y",
           "The quick brown", "while True:", "if __name__ =="]
N_TOKENS = 24
STAGGER_S = 0.15


def test_dsi_equals_si_and_nonsi_under_load(tiny_pair: tuple[Path, Path], log_dir: Path) -> None:
    import grpc

    target_dir, _ = tiny_pair
    started: list[Service] = []
    try:
        targets = [start_service("target", ["--model", str(target_dir), "--threads", "1",
                                            "--emulate-latency-ms", "30:30"], log_dir) for _ in range(3)]
        started += targets
        # The oracle drafter (the target model, its greedy token 80% of the time): real acceptance.
        drafter = start_service("drafter", ["--model", str(target_dir), "--threads", "1",
                                            "--emulate-latency-ms", "3:3", "--oracle-acceptance", "0.8",
                                            # Background drafts whenever the drafter is idle, however
                                            # busy it was (the default holds them under load), so that
                                            # urgent drafts do preempt them.
                                            "--background-max-load", "1"], log_dir)
        started.append(drafter)
        orch = start_service("orchestrator", ["--targets", ",".join(t.address for t in targets),
                                              "--drafter", drafter.address, "--lookahead", "3",
                                              # Speculation may take every idle target (no instance
                                              # kept back for other requests), so that critical windows
                                              # do have to preempt it (with the default headroom of one
                                              # the run below sometimes needed none).
                                              "--speculation-headroom", "0"], log_dir)
        started.append(orch)

        async def run(mode: str, seeded: bool) -> list[tuple[list[int], dict]]:
            async with AsyncClient(orch.address, timeout=300) as client:

                async def one(i: int, prompt: str) -> tuple[list[int], dict]:
                    # Staggered arrivals: the requests under way speculate on the targets left idle,
                    # and the critical windows of those that arrive next have to preempt it.
                    await asyncio.sleep(STAGGER_S * i)
                    r = await client.generate(prompt, max_new_tokens=N_TOKENS, mode=mode, ignore_eos=True,
                                              **({"temperature": 0.8, "top_k": 40, "seed": 100 + i} if seeded else {}))
                    return r.token_ids, r.stats

                return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS))))

        preempted = yielding = 0
        for seeded in (False, True):
            out = {mode: asyncio.run(run(mode, seeded)) for mode in ("dsi", "si", "nonsi")}
            tokens = {mode: [ids for ids, _ in results] for mode, results in out.items()}
            assert tokens["dsi"] == tokens["nonsi"], f"seeded={seeded}"
            assert tokens["si"] == tokens["nonsi"], f"seeded={seeded}"
            assert all(len(ids) == N_TOKENS for ids in tokens["dsi"])
            preempted += sum(int(st.get("windows_preempted", 0)) for _, st in out["dsi"])
            yielding += sum(int(st.get("windows_yielding", 0)) for _, st in out["dsi"])
        # The machinery was really at work: 8 staggered requests on 3 targets made critical windows
        # preempt speculative or yielding ones (12-14 preemptions in local runs; with all 8 sent at
        # once none was needed once short windows weighed every request under way), short critical
        # windows went out as yielding windows, and urgent drafts preempt background ones on the
        # drafter.
        assert preempted > 0
        assert yielding > 0
        with grpc.insecure_channel(drafter.address) as ch:
            info = drafter_pb2_grpc.DrafterServiceStub(ch).Info(drafter_pb2.DrafterInfoRequest(), timeout=10)
        assert info.counters.preempted > 0
    finally:
        for s in reversed(started):
            s.stop()
