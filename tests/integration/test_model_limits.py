"""What a model's checkpoint says, honoured through the services: its position limit (GPT-2's
n_positions) and the EOS ids of its generation_config.json, each against transformers in-process."""

from __future__ import annotations

import json
import random
from pathlib import Path

import grpc
import pytest
import torch

from dsi.client import Client, DSIError
from dsi.tiny_models import build_tiny_arch_pair
from tests.integration.procs import Service, greedy_reference, start_cluster, start_service

pytestmark = pytest.mark.integration

CONTEXT = 64  # the tiny GPT-2's n_positions
MODES = ("dsi", "si", "nonsi")


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_tiny_arch_pair(tmp_path_factory.mktemp("gpt2-ctx"), "gpt2", max_positions=CONTEXT)


@pytest.fixture(scope="module")
def cluster(gpt2_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    target_dir, drafter_dir = gpt2_pair
    with start_cluster(target_dir, drafter_dir, tmp_path_factory.mktemp("ctx-logs")) as c:
        yield c.orchestrator.address


def _prompt(n: int, seed: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, vocab) for _ in range(n)]


def _vocab(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["vocab_size"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_generation_up_to_the_context_limit(cluster: str, gpt2_pair: tuple[Path, Path], seed: int) -> None:
    """48 + 17 tokens reads 64 positions, as plain decoding does: every mode gives transformers' tokens."""
    target_dir, _ = gpt2_pair
    prompt = _prompt(CONTEXT - 16, seed, _vocab(target_dir))
    with Client(cluster, timeout=120) as client:
        out = {m: client.generate(prompt, max_new_tokens=17, mode=m, ignore_eos=True, lookahead=4) for m in MODES}
        sampled = {m: client.generate(prompt, max_new_tokens=17, mode=m, ignore_eos=True, lookahead=4,
                                      temperature=1.0, seed=seed) for m in MODES}
    want = greedy_reference(target_dir, prompt, 17)
    assert out["dsi"].token_ids == out["si"].token_ids == out["nonsi"].token_ids == want
    assert sampled["dsi"].token_ids == sampled["si"].token_ids == sampled["nonsi"].token_ids
    assert len(sampled["dsi"].token_ids) == 17


def test_past_the_context_is_refused_naming_the_limit(cluster: str, gpt2_pair: tuple[Path, Path]) -> None:
    prompt = _prompt(CONTEXT - 16, 3, _vocab(gpt2_pair[0]))
    with Client(cluster, timeout=60) as client:
        for mode in MODES:
            with pytest.raises(DSIError) as err:
                client.generate(prompt, max_new_tokens=18, mode=mode, ignore_eos=True)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "context is 64 tokens" in err.value.details and "max_new_tokens" in err.value.details
        with pytest.raises(DSIError) as err:
            client.generate(_prompt(CONTEXT + 1, 4, _vocab(gpt2_pair[0])), max_new_tokens=1)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_truncate_at_context_stops_cleanly_at_the_limit(cluster: str, gpt2_pair: tuple[Path, Path]) -> None:
    target_dir, _ = gpt2_pair
    prompt = _prompt(CONTEXT - 16, 5, _vocab(target_dir))
    with Client(cluster, timeout=120) as client:
        out = {m: client.generate(prompt, max_new_tokens=40, mode=m, ignore_eos=True, truncate_at_context=True)
               for m in MODES}
    for result in out.values():
        assert result.finish_reason == "length"
        assert result.token_ids == greedy_reference(target_dir, prompt, 17)


@pytest.fixture(scope="module")
def eos_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A Llama pair whose generation_config.json lists a second EOS id that config.json does not: one
    that plain greedy decoding produces partway through for the test prompts."""
    from transformers import AutoModelForCausalLM

    target_dir, drafter_dir = build_tiny_arch_pair(tmp_path_factory.mktemp("eos-pair"), "llama")
    vocab = _vocab(target_dir)
    firsts = [greedy_reference(target_dir, _prompt(12, s, vocab), 24) for s in range(6)]
    counts: dict[int, int] = {}
    for out in firsts:
        for tok in set(out[4:]):
            counts[tok] = counts.get(tok, 0) + 1
    eos = max((t for t in counts if t != 0), key=lambda t: counts[t])
    gen = json.loads((target_dir / "generation_config.json").read_text()) \
        if (target_dir / "generation_config.json").is_file() else {}
    gen["eos_token_id"] = [0, eos]
    (target_dir / "generation_config.json").write_text(json.dumps(gen))
    assert json.loads((target_dir / "config.json").read_text()).get("eos_token_id") in (0, [0])
    model = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()
    logs = tmp_path_factory.mktemp("eos-logs")
    started: list[Service] = []
    try:
        target = start_service("target", ["--model", str(target_dir), "--threads", "1"], logs)
        started.append(target)
        drafter = start_service("drafter", ["--model", str(drafter_dir), "--threads", "1"], logs)
        started.append(drafter)
        orch = start_service("orchestrator", ["--targets", target.address, "--drafter", drafter.address], logs)
        started.append(orch)
        yield orch.address, model, eos, vocab
    finally:
        for s in reversed(started):
            s.stop()


def test_eos_ids_from_generation_config_stop_like_transformers(eos_cluster) -> None:
    address, model, eos, vocab = eos_cluster
    stopped = 0
    with Client(address, timeout=120) as client:
        for seed in range(6):
            prompt = _prompt(12, seed, vocab)
            with torch.no_grad():
                ref = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):]
            want = ref.tolist()
            for mode in MODES:
                got = client.generate(prompt, max_new_tokens=24, mode=mode)
                assert got.token_ids == want, (mode, seed)
                assert got.finish_reason == ("eos" if want[-1] in (0, eos) else "length")
            stopped += want[-1] == eos
    assert stopped >= 1  # the second EOS id really ended some generations
