"""Verification math: greedy edge cases, seeded determinism, Gumbel-max coupling, and a statistical
test that rejection sampling follows the target distribution."""

from __future__ import annotations

import math

import pytest
import torch

from dsi.services.model.sampling import (
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
from dsi.services.runtime.params import Verification

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


def test_coupled_choice_is_gumbel_max_with_the_noise_of_its_own_position() -> None:
    """Row i is chosen as argmax(log p_i + g_{positions[i]}): p_i the filtered softmax it samples
    from, g_j the Gumbel noise of (seed, j). The reference is built here from those two pieces."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 100, generator=gen) * 2  # [6, vocab]
    positions = [40, 41, 42, 43, 44, 45]
    s = Sampling(temperature=0.8, top_k=50, top_p=0.95, seed=5)
    log_p = torch.log(target_distribution(logits, s)).double()  # [6, vocab], -inf where filtered out
    expected = [int(torch.argmax(log_p[i] + gumbel_noise(5, j, 100))) for i, j in enumerate(positions)]
    got = coupled_choice(logits, positions, s)
    assert got == expected
    assert all(bool(torch.isfinite(log_p[i, t])) for i, t in enumerate(got))  # never a filtered-out token
    # The rows are independent: the same logits at other positions (other noise) choose differently,
    # and each row's choice does not depend on which other rows are in the call.
    assert coupled_choice(logits, [p + 100 for p in positions], s) != got
    assert [coupled_choice(logits[i : i + 1], [j], s)[0] for i, j in enumerate(positions)] == got


def test_coupled_choice_hand_computed_cases() -> None:
    vocab = 7
    for seed, position in [(0, 0), (3, 11), (12345, 678)]:
        s = Sampling(temperature=1.0, seed=seed)
        # Flat logits: the Gumbel transform is increasing, so the choice is the largest uniform.
        u = uniform_noise(seed, position, vocab)
        assert coupled_choice(torch.zeros(1, vocab), [position], s) == [int(torch.argmax(u))]
        # A token 100 nats above the rest is chosen whatever the noise (Gumbel noise of 7 draws
        # stays far below 100); top_k=1 is greedy.
        peaked = torch.zeros(1, vocab)
        peaked[0, 4] = 100.0
        assert coupled_choice(peaked, [position], s) == [4]
        skewed = torch.arange(vocab, dtype=torch.float32).unsqueeze(0)  # [1, vocab]
        assert coupled_choice(skewed, [position], Sampling(temperature=1.0, top_k=1, seed=seed)) == [vocab - 1]


def test_coupling_makes_models_with_the_same_distribution_always_agree() -> None:
    """Drafter == target (here: other logits giving the same softmax) agree on every position under
    the same seed (acceptance 1), while a drafter with another distribution agrees only sometimes."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(50, 20, generator=gen)  # [50, vocab]
    positions = list(range(100, 150))
    s = Sampling(temperature=1.0, seed=5)
    target = coupled_choice(logits, positions, s)
    same_distribution = logits + torch.randn(50, 1, generator=gen) * 10  # a per-row constant
    assert coupled_choice(same_distribution, positions, s) == target
    other = coupled_choice(logits + torch.randn(50, 20, generator=gen), positions, s)
    agree = sum(a == b for a, b in zip(other, target, strict=True))
    assert 0 < agree < 50


def test_rejection_verify_edge_cases() -> None:
    vocab = 8
    logits = torch.full((3, vocab), -10.0)
    logits[:, 2] = 10.0  # the target is (almost) sure of token 2 everywhere
    s = Sampling(temperature=1.0, seed=1, verification=Verification.REJECTION)
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
    s0 = Sampling(temperature=1.0, verification=Verification.REJECTION)
    p = target_distribution(target_logits, s0)[0]
    counts = torch.zeros(vocab)
    accepted = 0
    trials = 6000
    for seed in range(trials):
        s = Sampling(temperature=1.0, seed=seed, verification=Verification.REJECTION)
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
