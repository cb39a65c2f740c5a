"""Prefix hashes (incremental Verify's checksum), the session cache keeping them in step with its
tokens through forwards, cancels and resets, the fill-token counter and per-token emulation."""

from __future__ import annotations

import random

import pytest
import torch

from dsi.services.model.emulation import Emulation
from dsi.services.model.loading import LoadedModel
from dsi.services.model.runner import ForwardCancelled, Job, ModelRunner
from dsi.services.runtime.model_errors import PrefixNotHeld
from dsi.services.runtime.prefixes import PrefixHashes, common_prefix_len, extend

pytestmark = pytest.mark.unit

VOCAB = 61


def test_prefix_hashes_append_truncate_and_extend() -> None:
    rng = random.Random(0)
    seq = [rng.randrange(VOCAB) for _ in range(50)]
    h = PrefixHashes(seq[:20])
    h.append(seq[20:])
    assert len(h) == 50
    for k in (0, 1, 20, 50):
        assert h.at(k) == PrefixHashes(seq[:k]).at(k) == extend(0, seq[:k])
    assert extend(h.at(30), seq[30:40]) == h.at(40)
    assert len({h.at(k) for k in range(51)}) == 51  # every prefix hashes differently here
    other = list(seq)
    other[10] = (other[10] + 1) % VOCAB
    assert PrefixHashes(other).at(50) != h.at(50) and PrefixHashes(other).at(10) == h.at(10)
    h.truncate(12)
    assert len(h) == 12 and h.at(12) == extend(0, seq[:12])
    assert common_prefix_len(seq, other) == 10 and common_prefix_len(seq, other, start=5) == 10
    assert common_prefix_len(seq, seq[:7], start=3) == 7


def test_emulation_charges_per_token_computed() -> None:
    e = Emulation.parse("40:20:0.5")
    assert e.pad_s(True, 100) == pytest.approx(0.04 + 0.05)
    assert e.pad_s(False, 4) == pytest.approx(0.02 + 0.002)
    assert Emulation.parse("40:20") == Emulation(0.04, 0.02, 0.0)
    for bad in ("1:2:3:4", "1", "-1:2", "1:2:-3"):
        with pytest.raises(ValueError):
            Emulation.parse(bad)


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    loaded = LoadedModel(model=model, name="tiny", device=torch.device("cpu"), dtype=torch.float32,
                         vocab_size=VOCAB, vocab_fingerprint="", eos_token_ids=[], num_layers=2, instance_id="t",
                         max_positions=256)
    r = ModelRunner(loaded)
    yield r
    r.close()


def _forward(runner: ModelRunner, ids: list[int], first_logit: int, known: int = 0, cancel: bool = False) -> None:
    job = Job()
    if cancel:
        handle = runner._layers[1].register_forward_pre_hook(lambda *_: job.cancel.set(), prepend=True)
    try:
        runner._run_job(job, lambda j: runner.forward(j, "s", ids, first_logit, known_prefix=known))
    finally:
        if cancel:
            handle.remove()


def test_session_hashes_follow_its_tokens_and_fill_tokens_are_counted(runner: ModelRunner) -> None:
    rng = random.Random(1)
    seq = [rng.randrange(1, VOCAB) for _ in range(40)]

    def in_step() -> list[int]:
        session = runner.sessions.peek("s")
        assert session is not None
        assert len(session.hashes) == len(session.tokens)
        assert session.hashes.at(len(session.tokens)) == extend(0, session.tokens)
        return session.tokens

    fill = runner.counters.cache_fill_tokens
    _forward(runner, seq[:20], 15)  # a prompt: 15 tokens only fill the cache
    assert in_step() == seq[:20] and runner.counters.cache_fill_tokens - fill == 15
    assert runner.held_prefix("s", 20, extend(0, seq[:20])) == seq[:20]
    _forward(runner, seq[:25], 20, known=20)  # a window on what it holds: nothing to fill
    assert in_step() == seq[:25] and runner.counters.cache_fill_tokens - fill == 15
    with pytest.raises(ForwardCancelled):  # diverges at 22, cancelled mid-forward: cut back
        _forward(runner, seq[:22] + [3, 4, 5], 22, cancel=True)
    assert in_step() == seq[:22]
    with pytest.raises(PrefixNotHeld):
        runner.held_prefix("s", 25, extend(0, seq[:25]))
    with pytest.raises(PrefixNotHeld):
        runner.held_prefix("s", 22, extend(0, seq[:21] + [0]))
    with pytest.raises(PrefixNotHeld):
        runner.held_prefix("nobody", 1, extend(0, seq[:1]))
    assert "nobody" not in runner.sessions  # asking created nothing
    _forward(runner, seq[:30], 28)  # catches up on 22..27: 6 fill tokens
    assert in_step() == seq[:30] and runner.counters.cache_fill_tokens - fill == 21
    runner.sessions.reset(runner.sessions.get("s"))
    assert in_step() == []
