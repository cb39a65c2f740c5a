"""Fixed-shape forwards (``Chunking``, the orchestrator's --reproducible): in bfloat16 a position's
logits are bit-identical whichever window computes them, after whatever cache history, cancels and
wrong drafts included, and equal to the 1-token-at-a-time (non-SI) computation."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from dsi.services.model.loading import LoadedModel
from dsi.services.model.runner import Chunking, ForwardCancelled, Job, ModelRunner

pytestmark = pytest.mark.unit

VOCAB = 97
PROMPT = 11
LENGTH = PROMPT + 30
CHUNK = 5  # lookahead 4 + 1


def _llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2))


def _gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=LENGTH + 2))


def _mistral_sliding() -> Any:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                            sliding_window=8))


@pytest.fixture(scope="module", params=[_llama, _gpt2, _mistral_sliding], ids=["llama", "gpt2", "mistral-sw"])
def runner(request: pytest.FixtureRequest) -> ModelRunner:
    torch.manual_seed(0)
    model = request.param().to(torch.bfloat16).eval()
    loaded = LoadedModel(model=model, name="tiny", device=torch.device("cpu"), dtype=torch.bfloat16,
                         vocab_size=VOCAB, vocab_fingerprint="", eos_token_ids=[], num_layers=3, instance_id="t",
                         max_positions=LENGTH + 2)
    r = ModelRunner(loaded)
    yield r
    r.close()


def _call(runner: ModelRunner, session: str, ids: list[int], first_logit: int, chunking: Chunking | None,
          cancel_before_layer: int | None = None) -> torch.Tensor:
    job = Job()
    handle = None
    if cancel_before_layer is not None:
        handle = runner._layers[cancel_before_layer].register_forward_pre_hook(
            lambda *_: job.cancel.set(), prepend=True)
    try:
        return runner._run_job(job, lambda j: runner.forward(j, session, ids, first_logit, chunking)[0])
    finally:
        if handle is not None:
            handle.remove()


def _sequence(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, VOCAB) for _ in range(LENGTH)]


def _nonsi_rows(
    runner: ModelRunner, seq: list[int], chunking: Chunking | None, session: str
) -> dict[int, torch.Tensor]:
    """Position -> logits, computed one position per call (the non-SI step)."""
    return {j: _call(runner, session, seq[:j], j - 1, chunking)[0] for j in range(PROMPT, LENGTH)}


def _window_rows(runner: ModelRunner, seq: list[int], chunking: Chunking, seed: int) -> dict[int, list[torch.Tensor]]:
    """Position -> logits from windows of random length over 3 sessions (as 3 target instances would
    hold them), with wrong drafts and cancelled forwards in between."""
    rng = random.Random(seed)
    got: dict[int, list[torch.Tensor]] = {}
    f = PROMPT
    while f < LENGTH:
        session = f"inst-{rng.randrange(3)}-{seed}"
        k = min(rng.randrange(0, CHUNK), LENGTH - 1 - f)  # drafts in this window
        drafts = list(seq[f : f + k])
        wrong = rng.randrange(k + 3)  # a wrong draft at this index (none when >= k)
        if wrong < k:
            drafts[wrong] = (drafts[wrong] + 1) % VOCAB
        if rng.random() < 0.3:  # a stale window, cancelled mid-forward
            with pytest.raises(ForwardCancelled):
                _call(runner, session, seq[:f] + [(t + 7) % VOCAB for t in drafts], f - 1, chunking,
                      cancel_before_layer=rng.randrange(1, 3))
        rows = _call(runner, session, seq[:f] + drafts, f - 1, chunking)  # [k + 1, vocab]
        valid = min(wrong, k) + 1  # positions whose whole prefix is the true sequence
        for i in range(valid):
            got.setdefault(f + i, []).append(rows[i])
        f += max(1, rng.randrange(1, valid + 1))
    return got


def test_every_position_is_bit_identical_whoever_computes_it(runner: ModelRunner) -> None:
    seq = _sequence(1)
    chunking = Chunking(PROMPT, CHUNK)
    want = _nonsi_rows(runner, seq, chunking, "nonsi")
    compared = 0
    for seed in range(3):
        for j, rows in _window_rows(runner, seq, chunking, seed).items():
            for row in rows:
                assert torch.equal(row, want[j]), f"position {j} differs (seed {seed})"
                compared += 1
    assert compared > 3 * (LENGTH - PROMPT) // 2


def test_chunks_cover_the_sequence_at_fixed_boundaries() -> None:
    c = Chunking(origin=7, size=5)
    assert [c.start_of(i) for i in (0, 6, 7, 11, 12, 16, 17)] == [0, 0, 7, 7, 12, 12, 17]
    assert c.pieces(0, 14, limit=100) == [(0, 7, 1), (7, 12, 5), (12, 17, 5)]
    assert c.pieces(12, 13, limit=100) == [(12, 17, 5)]
    assert c.pieces(12, 14, limit=15) == [(12, 15, 3)]  # never padded past the context


def test_logits_stay_close_to_the_plain_forward(runner: ModelRunner) -> None:
    """Chunking changes only rounding: the logits match the unchunked computation closely."""
    seq = _sequence(2)
    chunked = _call(runner, "c", seq, PROMPT - 1, Chunking(PROMPT, CHUNK)).float()
    plain = _call(runner, "p", seq, PROMPT - 1, None).float()
    assert chunked.shape == plain.shape == (LENGTH - PROMPT + 1, VOCAB)
    torch.testing.assert_close(chunked, plain, atol=0.1, rtol=0.05)
