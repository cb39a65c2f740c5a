"""DSI across model architecture families (Llama, GPT-2, Qwen2, Mistral with a sliding window, GPT-NeoX,
Gemma2 with hybrid sliding/global layers, Phi): for each, a real cluster (3 targets, a drafter, an
orchestrator, as processes, with emulated latency so stale windows are cancelled mid-forward) must give
DSI == SI == non-SI == an in-process full-recompute reference, greedy and with seeded sampling, over
sequences longer than the sliding window."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dsi.client import Client, GenerateResult
from dsi.services.model.sampling import Sampling, coupled_choice
from dsi.tiny_models import ARCHITECTURES
from dsi.v1 import target_pb2, target_pb2_grpc
from tests.integration.procs import Service, start_service

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SLIDING_WINDOW = 16  # what the tiny_arch_pairs fixture builds with
N_NEW = 32
# Prompt lengths in tokens: one shorter than the sliding window (generation crosses it), two longer.
GREEDY_PROMPT_LENGTHS = (10, 24, 36)
# (prompt length, seed) of the seeded-sampling requests.
SAMPLED_PROMPTS = ((14, 1001), (22, 1002), (30, 1003))
TEMPERATURE = 0.8
LOOKAHEAD = 3
MODES = ("dsi", "si", "nonsi")
# Emulated PREFILL:DECODE latency (ms): slow targets next to a fast drafter keep several windows in
# flight, so a rejection cancels windows whose forward pass is still running.
TARGET_LATENCY = "8:8"
DRAFTER_LATENCY = "2:2"
N_TARGETS = 3
TEXT = (
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "class Foo(object):\n    def __init__(self, x):\n        self.x = x\n\n"
    "The quick brown fox jumps over the lazy dog. Hello, world! 0123456789\n"
)


@dataclass
class ArchCluster:
    arch: str
    target_dir: Path
    targets: list[Service]
    orchestrator: str
    text_ids: list[int]
    reference_model: Any  # the target checkpoint loaded in-process (transformers PreTrainedModel)

    def prompt(self, length: int, offset: int = 0) -> list[int]:
        ids = self.text_ids[offset : offset + length]
        assert len(ids) == length, (len(self.text_ids), offset, length)
        return ids


def _start_in_parallel(jobs: list[tuple[str, list[str]]], logs: Path, started: list[Service]) -> list[Service]:
    """Start services at once (their model loads overlap); every one that came up is added to
    ``started`` (for the caller to stop) before the first failure, if any, is raised."""
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = [pool.submit(start_service, role, args, logs) for role, args in jobs]
    errors: list[BaseException] = []
    services: list[Service] = []
    for f in futures:
        exc = f.exception()
        if exc is None:
            services.append(f.result())
        else:
            errors.append(exc)
    started.extend(services)
    if errors:
        raise errors[0]
    return services


def _stop_all(services: list[Service]) -> None:
    """Stop the orchestrator(s) first (so none sees its targets vanish mid-request), then the model
    services at once (each takes a few seconds to shut down)."""
    for s in services:
        if s.role == "orchestrator":
            s.stop()
    with ThreadPoolExecutor(max_workers=max(len(services), 1)) as pool:
        for f in [pool.submit(s.stop) for s in services if s.role != "orchestrator"]:
            f.result()


def _target_counters(targets: list[Service]) -> list[Any]:
    counters = []
    for t in targets:
        with grpc.insecure_channel(t.address) as ch:
            info = target_pb2_grpc.TargetServiceStub(ch).Info(target_pb2.TargetInfoRequest(), timeout=10)
        counters.append(info.counters)
    return counters


def _mid_forward(targets: list[Service]) -> int:
    return sum(c.cancelled_mid_forward for c in _target_counters(targets))


@pytest.fixture(scope="module", params=ARCHITECTURES)
def cluster(
    request: pytest.FixtureRequest,
    tiny_arch_pairs: Callable[[str], tuple[Path, Path]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ArchCluster]:
    """One cluster per architecture: N_TARGETS targets, a drafter and an orchestrator, all stopped after."""
    arch: str = request.param
    target_dir, drafter_dir = tiny_arch_pairs(arch)
    logs = tmp_path_factory.mktemp(f"arch-logs-{arch}")
    model_args = ["--threads", "1"]
    started: list[Service] = []
    try:
        services = _start_in_parallel(
            [("target", ["--model", str(target_dir), *model_args, "--emulate-latency-ms", TARGET_LATENCY])] * N_TARGETS
            + [("drafter", ["--model", str(drafter_dir), *model_args, "--emulate-latency-ms", DRAFTER_LATENCY])],
            logs, started,
        )
        targets = services[:N_TARGETS]
        orch = start_service("orchestrator", ["--targets", ",".join(t.address for t in targets),
                                              "--drafter", services[-1].address], logs)
        started.append(orch)
        tok = AutoTokenizer.from_pretrained(str(target_dir))
        text_ids = tok(TEXT, add_special_tokens=False)["input_ids"]
        model = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()
        yield ArchCluster(arch, target_dir, targets, orch.address, text_ids, model)
    finally:
        _stop_all(started)


def _reference(model: Any, prompt: list[int], n: int, sampling: Sampling) -> list[int]:
    """Target-only decoding in-process, recomputing the whole sequence at every step (no KV cache, so
    no cache or sliding-window bookkeeping can be wrong), choosing each token with the shared
    greedy / Gumbel-coupled rule at its absolute position."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq])).logits[0, -1:].float()  # [1, vocab]
            seq.append(coupled_choice(logits, [len(seq)], sampling)[0])
    return seq[len(prompt) :]


def _run_modes(client: Client, prompt: list[int], **kw: Any) -> dict[str, GenerateResult]:
    return {m: client.generate(prompt, mode=m, max_new_tokens=N_NEW, ignore_eos=True, lookahead=LOOKAHEAD, **kw)
            for m in MODES}


def _assert_partial_acceptance(results: list[GenerateResult]) -> float:
    """The drafter agrees only partly: both accepted drafts and rejections happened."""
    accepted = sum(r.stats["drafts_accepted"] for r in results)
    rejections = sum(r.stats["epochs"] - 1 for r in results)
    assert accepted > 0 and rejections > 0, (accepted, rejections)
    assert all(r.stats["max_windows_in_flight"] > 1 for r in results)  # windows really overlapped
    return sum(r.stats["acceptance_rate"] for r in results) / len(results)


def _wait_mid_forward_cancels(targets: list[Service], before: int, timeout_s: float = 10.0) -> int:
    """Cancelled mid-forward Verify calls since ``before``, waiting (polling) for them to show up: a
    cancel reaches the target's worker shortly after the orchestrator has moved on."""
    deadline = time.monotonic() + timeout_s
    while True:
        delta = _mid_forward(targets) - before
        if delta > 0 or time.monotonic() > deadline:
            return delta
        time.sleep(0.05)


def test_sliding_window_is_real(tiny_arch_pairs: Callable[[str], tuple[Path, Path]]) -> None:
    """The sliding-window pairs really attend to a window: past it, logits differ from the same
    weights attending globally (so the cluster tests below exercise the window)."""
    for arch in ("mistral-sw", "gemma2"):
        target_dir, _ = tiny_arch_pairs(arch)
        assert AutoConfig.from_pretrained(str(target_dir)).sliding_window == SLIDING_WINDOW
        ids = torch.randint(1, 300, (1, 3 * SLIDING_WINDOW), generator=torch.Generator().manual_seed(0))
        windowed = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()
        wide_config = AutoConfig.from_pretrained(str(target_dir))
        wide_config.sliding_window = 1 << 20
        wide = AutoModelForCausalLM.from_pretrained(str(target_dir), config=wide_config, dtype=torch.float32).eval()
        with torch.no_grad():
            diff = (windowed(ids).logits[0] - wide(ids).logits[0]).abs().amax(-1)  # [seq]
        assert float(diff[:SLIDING_WINDOW].max()) < 1e-4, arch
        assert float(diff[SLIDING_WINDOW + 1 :].min()) > 1e-3, arch


def test_greedy_dsi_equals_si_nonsi_and_reference(cluster: ArchCluster) -> None:
    before = _mid_forward(cluster.targets)
    results: list[GenerateResult] = []
    with Client(cluster.orchestrator, timeout=120) as client:
        for i, length in enumerate(GREEDY_PROMPT_LENGTHS):
            prompt = cluster.prompt(length, offset=i)
            out = _run_modes(client, prompt)
            expected = _reference(cluster.reference_model, prompt, N_NEW, Sampling())
            assert len(set(expected)) > 4, expected  # the tiny model's output is not degenerate
            for mode in MODES:
                assert out[mode].token_ids == expected, (cluster.arch, mode, length)
                assert out[mode].stats["new_tokens"] == N_NEW
            results.append(out["dsi"])
    acceptance = _assert_partial_acceptance(results)
    mid_forward = _wait_mid_forward_cancels(cluster.targets, before)
    print(f"\n[{cluster.arch}] greedy: dsi acceptance {acceptance:.2f}, "
          f"windows cancelled {sum(r.stats['windows_cancelled'] for r in results)}, "
          f"target cancels mid-forward {mid_forward}")
    assert mid_forward > 0  # rejections stopped running forward passes on the targets


def test_seeded_sampling_dsi_equals_si_nonsi_and_reference(cluster: ArchCluster) -> None:
    before = _mid_forward(cluster.targets)
    results: list[GenerateResult] = []
    with Client(cluster.orchestrator, timeout=120) as client:
        for length, seed in SAMPLED_PROMPTS:
            prompt = cluster.prompt(length)
            out = _run_modes(client, prompt, temperature=TEMPERATURE, top_k=0, top_p=1.0, seed=seed)
            expected = _reference(cluster.reference_model, prompt, N_NEW,
                                  Sampling(temperature=TEMPERATURE, top_k=0, top_p=1.0, seed=seed))
            for mode in MODES:
                assert out[mode].token_ids == expected, (cluster.arch, mode, length, seed)
                assert out[mode].stats["seed"] == seed
            results.append(out["dsi"])
        # The same prompt with another seed samples something else (the noise is really seeded).
        length, seed = SAMPLED_PROMPTS[0]
        other = client.generate(cluster.prompt(length), mode="dsi", max_new_tokens=N_NEW, ignore_eos=True,
                                lookahead=LOOKAHEAD, temperature=TEMPERATURE, seed=seed + 100)
        assert other.token_ids != results[0].token_ids
    acceptance = _assert_partial_acceptance(results)
    mid_forward = _wait_mid_forward_cancels(cluster.targets, before)
    print(f"\n[{cluster.arch}] sampled: dsi acceptance {acceptance:.2f}, "
          f"windows cancelled {sum(r.stats['windows_cancelled'] for r in results)}, "
          f"target cancels mid-forward {mid_forward}")
    assert mid_forward > 0
