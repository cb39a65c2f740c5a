"""Target/drafter vocabulary pairing through real services: a drafter whose embedding is padded
beyond the target's (same tokenizer) is accepted and never proposes an id the target cannot score;
a mismatched pair is refused with one clear line, no traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dsi.client import Client
from dsi.tiny_models import TinyPairSpec, build_tiny_pair
from dsi.v1 import common_pb2, drafter_pb2, drafter_pb2_grpc
from tests.integration.procs import Service, start_service

pytestmark = pytest.mark.integration

PAD = 64
PROMPTS = ["def fibonacci(n):", "The quick brown", "import os\n", "class Foo:", "for i in range(10):"]
N_TOKENS = 12


def pad_drafter(src: Path, dst: Path) -> int:
    """Copy the drafter at src to dst with PAD more output rows; returns the original vocab size.

    The padding rows are made to dominate: pairs of opposite directions (+u, -u) scaled far above the
    real rows, so for any hidden state one of them has the largest logit. Unmasked, the drafter would
    propose a padding id at every step."""
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    n = int(model.get_output_embeddings().weight.shape[0])
    model.resize_token_embeddings(n + PAD, mean_resizing=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head = model.get_output_embeddings().weight  # [n + PAD, hidden]
        dirs = torch.randn(PAD // 2, head.shape[1], generator=gen)  # [PAD / 2, hidden]
        dirs = dirs / dirs.norm(dim=-1, keepdim=True) * 50 * head[:n].norm(dim=-1).max()
        head[n:] = torch.cat([dirs, -dirs])
    dst.mkdir(parents=True)
    model.save_pretrained(str(dst))
    for f in src.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, dst / f.name)
    assert AutoConfig.from_pretrained(str(dst)).vocab_size == n + PAD
    return n


@pytest.fixture(scope="module")
def padded(tiny_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Two targets (vocab N), a drafter padded to N + PAD logits (same tokenizer), an orchestrator."""
    target_dir, drafter_dir = tiny_pair
    root = tmp_path_factory.mktemp("padded")
    n = pad_drafter(drafter_dir, root / "drafter")
    assert AutoConfig.from_pretrained(str(target_dir)).vocab_size == n
    logs = root / "logs"
    logs.mkdir()
    started: list[Service] = []
    try:
        # Slow (emulated) target forwards let drafts arrive before the verdicts, so DSI uses them too.
        targets = [start_service("target", ["--model", str(target_dir), "--threads", "1",
                                            "--emulate-latency-ms", "20:20"], logs) for _ in range(2)]
        started += targets
        drafter = start_service("drafter", ["--model", str(root / "drafter"), "--threads", "1"], logs)
        started.append(drafter)
        orch = start_service("orchestrator", ["--targets", ",".join(t.address for t in targets),
                                              "--drafter", drafter.address], logs)
        started.append(orch)
        yield {"n": n, "targets": targets, "drafter": drafter, "orchestrator": orch}
    finally:
        for s in reversed(started):
            s.stop()


def _flow(address: str, start: drafter_pb2.DraftRequest) -> list[drafter_pb2.DraftResponse]:
    with grpc.insecure_channel(address) as ch:
        stub = drafter_pb2_grpc.DrafterServiceStub(ch)
        return list(stub.DraftFlow(iter([drafter_pb2.DraftFlowRequest(start=start)]), timeout=60))


def test_draft_flow_and_draft_propose_only_ids_below_vocab_limit(padded: dict) -> None:
    n, address = padded["n"], padded["drafter"].address
    prefix = [5, 6, 7, 8]
    greedy = common_pb2.SamplingParams(temperature=0.0)
    sampled = common_pb2.SamplingParams(temperature=0.8, seed=11)
    rejection = common_pb2.SamplingParams(temperature=0.8, seed=11, verification=common_pb2.VERIFICATION_REJECTION)

    def ids(sampling: common_pb2.SamplingParams, limit: int, probs: bool = False) -> list[int]:
        msgs = _flow(address, drafter_pb2.DraftRequest(session_id=f"s{limit}", token_ids=prefix, max_tokens=8,
                                                       sampling=sampling, return_probs=probs, vocab_limit=limit))
        assert len(msgs) == 8
        if probs:
            assert all(m.HasField("probs") and max(m.probs.token_ids) < n for m in msgs)
        return [m.token_id for m in msgs]

    # Unlimited, the dominant padding rows win: the limit below is what keeps drafts in range.
    assert max(ids(greedy, 0)) >= n
    for sampling in (greedy, sampled):
        assert max(ids(sampling, n)) < n
    assert max(ids(rejection, n, probs=True)) < n
    # The unary Draft path honours it too.
    with grpc.insecure_channel(address) as ch:
        stub = drafter_pb2_grpc.DrafterServiceStub(ch)
        unary = [m.token_id for m in stub.Draft(drafter_pb2.DraftRequest(
            session_id="u", token_ids=prefix, max_tokens=8, sampling=sampled, vocab_limit=n), timeout=60)]
        assert max(unary) < n
        assert unary == ids(sampled, n)  # the same drafts through both paths
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Draft(drafter_pb2.DraftRequest(session_id="u", token_ids=prefix, max_tokens=2,
                                                     vocab_limit=-1), timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("vocab_limit")
    with pytest.raises(grpc.RpcError) as err:
        _flow(address, drafter_pb2.DraftRequest(session_id="f", token_ids=prefix, max_tokens=2, vocab_limit=-5))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("vocab_limit")


@pytest.mark.slow
def test_a_padded_drafter_pairs_up_and_output_equals_non_si(padded: dict) -> None:
    accepted = {"dsi": 0, "si": 0}
    with Client(padded["orchestrator"].address, timeout=120) as client:
        info = client.info()
        assert info["drafter_model"]["vocab_size"] == padded["n"] + PAD
        for i, prompt in enumerate(PROMPTS):
            for kw in (dict(), dict(temperature=0.8, seed=100 + i)):
                out = {m: client.generate(prompt, max_new_tokens=N_TOKENS, mode=m, ignore_eos=True, lookahead=3,
                                          **kw)
                       for m in ("dsi", "si", "nonsi")}
                assert out["dsi"].token_ids == out["si"].token_ids == out["nonsi"].token_ids, (prompt, kw)
                for m in ("dsi", "si"):
                    assert not out[m].stats["drafter_failed"], (m, prompt, kw)
                    accepted[m] += out[m].stats["drafts_accepted"]
    # Drafts from the shared vocabulary were proposed, verified and matched the target's tokens.
    assert accepted["dsi"] > 0 and accepted["si"] > 0, accepted


def test_a_mismatched_pair_is_refused_in_one_line_without_traceback(padded: dict, tmp_path: Path) -> None:
    _, other_drafter = build_tiny_pair(tmp_path / "other", TinyPairSpec(seed=3, vocab_size=300))
    drafter = start_service("drafter", ["--model", str(other_drafter), "--threads", "1"], tmp_path)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "dsi.cli", "serve", "orchestrator", "--port", "0",
             "--targets", padded["targets"][0].address, "--drafter", drafter.address, "--startup-timeout-s", "30"],
            capture_output=True, text=True, timeout=120,
        )
    finally:
        drafter.stop()
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    refusals = [line for line in output.splitlines() if "refusing to start" in line]
    assert len(refusals) == 1, output
    assert "do not share a vocabulary" in refusals[0]
    assert "Traceback" not in output, output
    assert "Event loop is closed" not in output, output


@pytest.mark.parametrize("role", ["target", "drafter"])
def test_a_model_that_cannot_be_loaded_is_refused_in_one_line(role: str, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "dsi.cli", "serve", role, "--port", "0", "--model", str(tmp_path / "empty")],
        capture_output=True, text=True, timeout=120,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    refusals = [line for line in output.splitlines() if "refusing to start" in line]
    assert len(refusals) == 1 and "could not load a causal LM" in refusals[0], output
    assert "Traceback" not in output and "Event loop is closed" not in output, output
