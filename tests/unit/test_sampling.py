"""Verification math: greedy edge cases, seeded determinism, Gumbel-max coupling, and a statistical
test that rejection sampling follows the target distribution."""

from __future__ import annotations

import math

import pytest
import torch

from services.model.sampling import (
    Sampling,
    coupled_choice,
    dense_from_sparse,
    draft_sample,
    filter_logits,
    gumbel_noise,
    rejection_verify,
    sparse_from_dense,
    target_distribution,
    uniform_noise,
)

pytestmark = pytest.mark.unit

# Critical values of the chi-square distribution at p = 0.001.
CHI2_999 = {5: 20.515, 7: 24.322}


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    n = counts.sum().item()
    keep = probs > 0
    expected = probs[keep] * n
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    assert counts[~keep].sum() == 0, "sampled a token with zero probability"
    return stat, int(keep.sum()) - 1


def test_noise_is_deterministic_uniform_and_seed_dependent() -> None:
    u = uniform_noise(123, 7, 5000)
    assert torch.equal(u, uniform_noise(123, 7, 5000))
    assert not torch.equal(u, uniform_noise(124, 7, 5000))
    assert not torch.equal(u, uniform_noise(123, 8, 5000))
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.02
    # Pinned values: the hash must give the same noise everywhere (CPU, GPU, other machines, releases).
    assert [round(float(x), 9) for x in uniform_noise(0, 0, 3)] == [0.811782413, 0.666290455, 0.944052733]
    assert [round(float(x), 9) for x in uniform_noise(12345, 678, 2)] == [0.766095537, 0.276122137]
    g = gumbel_noise(5, 5, 20000)
    assert abs(float(g.mean()) - 0.5772) < 0.05  # Euler-Mascheroni: the Gumbel mean


def test_greedy_choice_is_argmax_and_ignores_seed() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    expected = torch.argmax(logits, dim=-1).tolist()
    assert coupled_choice(logits, [10, 11, 12, 13], Sampling()) == expected
    assert coupled_choice(logits, [10, 11, 12, 13], Sampling(seed=99)) == expected


def test_filter_top_k_and_top_p() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, 1.0, 2, 1.0)[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, 1.0, 2, 1.0)[0, :2]).all()
    p = torch.softmax(logits, -1)[0]
    # top_p just above p[0]: keeps the two most likely tokens.
    kept = torch.isfinite(filter_logits(logits, 1.0, 0, float(p[0]) + 1e-4)[0])
    assert kept.tolist() == [True, True, False, False, False]
    # The most likely token always stays, even with a tiny top_p.
    assert torch.isfinite(filter_logits(logits, 1.0, 0, 1e-6)[0]).tolist() == [True, False, False, False, False]


def test_coupled_sampling_is_exact_sample_of_filtered_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 0.2, 1.5]])
    s0 = Sampling(temperature=0.7, top_k=6)
    probs = target_distribution(logits, s0)[0]
    counts = torch.zeros(8)
    for seed in range(4000):
        s = Sampling(temperature=0.7, top_k=6, seed=seed)
        counts[coupled_choice(logits, [3], s)[0]] += 1
    stat, df = chi_square(counts, probs)
    assert df == 5
    assert stat < CHI2_999[df], stat


def test_coupling_makes_same_model_always_agree() -> None:
    # Drafter == target: under the same noise every draft is accepted (acceptance 1).
    logits = torch.randn(6, 100, generator=torch.Generator().manual_seed(1))
    s = Sampling(temperature=1.0, seed=5)
    assert coupled_choice(logits, list(range(6)), s) == coupled_choice(logits.clone(), list(range(6)), s)


def test_rejection_verify_edge_cases() -> None:
    vocab = 8
    logits = torch.full((3, vocab), -10.0)
    logits[:, 2] = 10.0  # the target is (almost) sure of token 2 everywhere
    s = Sampling(temperature=1.0, seed=1, rejection=True)
    q_good = torch.zeros(vocab)
    q_good[2] = 1.0
    # Full match: both drafts accepted, bonus sampled from p.
    assert rejection_verify(logits, [2, 2], [q_good, q_good], 5, s) == [2, 2, 2]
    # First-token mismatch: the drafter was sure of 3, the target gives it ~0 -> recovered token 2.
    q_bad = torch.zeros(vocab)
    q_bad[3] = 1.0
    out = rejection_verify(logits, [3, 2], [q_bad, q_good], 5, s)
    assert out[0] == 2
    # Empty draft: only the bonus token.
    assert rejection_verify(logits[:1], [], [], 5, s) == [2]


def test_rejection_sampling_follows_target_distribution() -> None:
    """Chi-square over many seeds: the first token after a window follows p, whatever q is."""
    gen = torch.Generator().manual_seed(3)
    vocab = 8
    target_logits = torch.randn(1, vocab, generator=gen) * 1.5  # [1, vocab]
    drafter_logits = torch.randn(vocab, generator=gen) * 1.5  # [vocab], a different distribution
    s0 = Sampling(temperature=1.0, rejection=True)
    p = target_distribution(target_logits, s0)[0]
    counts = torch.zeros(vocab)
    accepted = 0
    trials = 6000
    for seed in range(trials):
        s = Sampling(temperature=1.0, seed=seed, rejection=True)
        draft, q = draft_sample(drafter_logits, 10, s)
        ids, probs = sparse_from_dense(q)
        q_wire = dense_from_sparse(ids, probs, vocab, torch.device("cpu"))  # as it crosses the wire
        logits = torch.cat([target_logits, target_logits])  # [2, vocab]: draft row + bonus row
        first = rejection_verify(logits, [draft], [q_wire], 10, s)[0]
        counts[first] += 1
        accepted += first == draft
    stat, df = chi_square(counts, p)
    assert df == 7
    assert stat < CHI2_999[df], (stat, counts / trials, p)
    # The acceptance rate matches theory: sum_x min(p(x), q(x)).
    q_full = target_distribution(drafter_logits.unsqueeze(0), s0)[0]
    expected = float(torch.minimum(p, q_full).sum())
    assert math.isclose(accepted / trials, expected, abs_tol=0.03)
