"""Reduced precision through the services: with the orchestrator's --reproducible, bfloat16 output is
identical across DSI, SI and non-SI and across repeated DSI runs (windows racing on 3 targets with
emulated latency, cancels included), greedy and seeded."""

from __future__ import annotations

import random

import pytest

from dsi.client import Client
from dsi.tiny_models import build_tiny_arch_pair
from dsi.v1 import target_pb2, target_pb2_grpc
from tests.integration.procs import Service, start_service

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_PROMPTS = 4
NEW_TOKENS = 20


@pytest.fixture(scope="module", params=["gpt2"])
def bf16_cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    target_dir, drafter_dir = build_tiny_arch_pair(tmp_path_factory.mktemp(f"bf16-{request.param}"), request.param)
    logs = tmp_path_factory.mktemp("bf16-logs")
    common = ["--threads", "1", "--dtype", "bfloat16"]
    started: list[Service] = []
    try:
        targets = [start_service("target", ["--model", str(target_dir), *common, "--emulate-latency-ms", "6:6"],
                                 logs) for _ in range(3)]
        started += targets
        drafter = start_service("drafter", ["--model", str(drafter_dir), *common, "--emulate-latency-ms", "1:1"],
                                logs)
        started.append(drafter)
        orch = start_service("orchestrator", ["--targets", ",".join(t.address for t in targets),
                                              "--drafter", drafter.address, "--reproducible"], logs)
        started.append(orch)
        yield orch.address, targets
    finally:
        for s in reversed(started):
            s.stop()


def _cancelled_mid_forward(targets: list[Service]) -> int:
    import grpc

    total = 0
    for t in targets:
        with grpc.insecure_channel(t.address) as channel:
            info = target_pb2_grpc.TargetServiceStub(channel).Info(target_pb2.TargetInfoRequest(), timeout=10)
            total += info.counters.cancelled_mid_forward + info.counters.cancelled_queued
    return total


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_bf16_output_is_identical_across_modes_and_runs(bf16_cluster, temperature: float) -> None:
    address, targets = bf16_cluster
    rng = random.Random(0)
    with Client(address, timeout=120) as client:
        for i in range(N_PROMPTS):
            prompt = [rng.randrange(1, 300) for _ in range(rng.randrange(8, 20))]
            kwargs = dict(max_new_tokens=NEW_TOKENS, ignore_eos=True, lookahead=3, temperature=temperature, seed=i)
            nonsi = client.generate(prompt, mode="nonsi", **kwargs).token_ids
            assert len(nonsi) == NEW_TOKENS
            assert client.generate(prompt, mode="si", **kwargs).token_ids == nonsi, (i, "si")
            for run in range(2):
                assert client.generate(prompt, mode="dsi", **kwargs).token_ids == nonsi, (i, "dsi", run)
    assert _cancelled_mid_forward(targets) > 0  # windows really raced and were preempted
