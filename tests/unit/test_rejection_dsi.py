"""Rejection-sampling verification in DSI mode, beyond the first token: the DSI scheduler with a fake
target and drafter that run the real verification math (``rejection_verify``, ``draft_sample``) on
small synthetic models. What ``verification="rejection"`` promises is losslessness in distribution
(README, "Sampling"): over many seeds, DSI's first tokens jointly follow the target's distribution,
whatever the drafter, while SI reproduces its own output for a seed."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections import Counter
from collections.abc import Mapping

import pytest
import torch

from dsi.services.model.sampling import (
    Sampling,
    dense_from_sparse,
    draft_sample,
    rejection_verify,
    sparse_from_dense,
    target_distribution,
)
from dsi.services.orchestrator.scheduler import CommittedToken, Draft, Scheduler, SchedulerConfig, Source, WindowRequest
from dsi.services.runtime.params import Verification
from tests.unit.fakes import CreditStream, FakeTarget, run_virtual

pytestmark = pytest.mark.unit

VOCAB = 2
PROMPT = [0, 1]
TOKENS = 5
TEMPERATURE = 1.0


def _logits(prefix: list[int], salt: str) -> torch.Tensor:
    """A synthetic model: logits that are a fixed pseudo-random function of the prefix.  # [vocab]"""
    digest = hashlib.blake2b(f"{salt}:{prefix}".encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & 0x7FFFFFFF)
    return torch.randn(VOCAB, generator=gen) * 1.5


def target_logits(prefix: list[int]) -> torch.Tensor:
    return _logits(prefix, "target")


def drafter_logits(prefix: list[int]) -> torch.Tensor:
    return _logits(prefix, "drafter")  # another distribution: drafts are often rejected


def _sampling(session_id: str) -> Sampling:
    return Sampling(temperature=TEMPERATURE, seed=int(session_id), verification=Verification.REJECTION)


class RejectionTarget(FakeTarget):
    """Verifies a window as the target service does under rejection sampling."""

    scored: int = 0  # drafts verified by rejection sampling (all windows)
    wrong_q: int = 0  # drafts that came with a q other than the drafter's at their position

    def __init__(self) -> None:
        super().__init__(instances=3, latency=1.0)

    async def verify(self, window: WindowRequest):  # type: ignore[no-untyped-def]
        result = await super().verify(window)  # the latency, the accounting, the cancel behaviour
        ids, first = window.token_ids, window.first_position
        rows = torch.stack([target_logits(ids[:j]) for j in range(first, len(ids) + 1)])  # [drafts + 1, vocab]
        probs = window.draft_probs or []
        assert len(probs) == len(ids) - first
        q = [dense_from_sparse(t, p, VOCAB, torch.device("cpu")) for t, p in probs]
        self.scored += len(q)
        s = _sampling(window.session_id)
        for i, q_i in enumerate(q):  # each draft came with the drafter's q at its own position
            own = target_distribution(drafter_logits(ids[: first + i]).unsqueeze(0), s)[0]
            self.wrong_q += not torch.allclose(q_i, own, atol=1e-6)
        tokens = rejection_verify(rows, ids[first:], q, first, s)
        return type(result)(tokens, result.target, result.compute_s)


class SampledStream(CreditStream):
    """A credit-based draft stream (``fakes.CreditStream``) whose drafts are sampled from q."""

    def __init__(self, session_id: str, prefix: list[int], max_tokens: int, latency: float) -> None:
        super().__init__(prefix, max_tokens)
        self.s = _sampling(session_id)
        self._latency = latency

    @property
    def latency(self) -> float:
        return self._latency

    def next_draft(self, seq: list[int]) -> Draft:
        token, q = draft_sample(drafter_logits(seq), len(seq), self.s)
        return Draft(token, sparse_from_dense(q))


class SampledDrafter:
    def __init__(self, latency: float = 0.1) -> None:
        self.latency = latency

    def open(self, session_id: str, prefix: list[int], max_tokens: int, return_probs: bool) -> SampledStream:
        assert return_probs  # rejection sampling needs q with every draft
        return SampledStream(session_id, prefix, max_tokens, self.latency)


def _generate(mode: str, seeds: range, lookahead: int) -> tuple[list[tuple[int, ...]], int, int]:
    """Each seed's first TOKENS tokens (all requests run at once on the virtual clock), drafts
    verified by rejection sampling, and tokens after the first committed from an accepted draft.
    Every draft must reach the target with the drafter's q at its position."""
    target = RejectionTarget()
    target.instances = 3 * len(seeds)  # no contention between requests: each has 3 instances' worth
    outputs: dict[int, list[CommittedToken]] = {seed: [] for seed in seeds}

    async def main() -> None:
        async def one(seed: int) -> None:
            config = SchedulerConfig(mode=mode, lookahead=lookahead, sp_degree=3, max_new_tokens=TOKENS,
                                     rejection=True)
            sched = Scheduler(target, SampledDrafter(), config, str(seed))
            await sched.run(PROMPT, lambda tok: outputs[seed].append(tok) or False)

        await asyncio.gather(*(one(seed) for seed in seeds))

    run_virtual(main)
    assert target.wrong_q == 0, f"{target.wrong_q} of {target.scored} drafts came with another position's q"
    later_from_drafts = sum(t.source is Source.DRAFT for out in outputs.values() for t in out[1:])
    return [tuple(t.token_id for t in outputs[seed]) for seed in seeds], target.scored, later_from_drafts


def _exact_joint() -> dict[tuple[int, ...], float]:
    """P(first TOKENS tokens) under the target alone: the product of its conditionals."""
    s = Sampling(temperature=TEMPERATURE)
    joint = {}
    for seq in itertools.product(range(VOCAB), repeat=TOKENS):
        prob = 1.0
        for i, tok in enumerate(seq):
            p = target_distribution(target_logits(PROMPT + list(seq[:i])).unsqueeze(0), s)[0]
            prob *= float(p[tok])
        joint[seq] = prob
    return joint


def _chi_square(observed: Mapping[tuple[int, ...], float], expected: dict[tuple[int, ...], float]) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom, cells expecting fewer than 5 pooled into one."""
    small = [k for k, e in expected.items() if e < 5]
    pairs = [(observed.get(k, 0), e) for k, e in expected.items() if e >= 5]
    pairs.append((sum(observed.get(k, 0) for k in small), sum(expected[k] for k in small)))
    pairs = [(o, e) for o, e in pairs if e > 0]
    return sum((o - e) ** 2 / e for o, e in pairs), len(pairs) - 1


def _chi_square_critical(df: int) -> float:
    """Wilson-Hilferty approximation of the chi-square 0.999 quantile."""
    z = 3.09
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


@pytest.mark.slow
@pytest.mark.parametrize("lookahead", [2, 3])
def test_dsi_rejection_sampling_follows_the_target_over_several_tokens(lookahead: int) -> None:
    trials = 2000
    outputs, scored, later_from_drafts = _generate("dsi", range(trials), lookahead)
    joint = _exact_joint()
    counts = Counter(outputs)
    assert set(counts) <= set(joint)
    expected = {k: v * trials for k, v in joint.items()}
    stat, df = _chi_square(counts, expected)
    assert stat < _chi_square_critical(df), (stat, df)
    # Rejection sampling really decided tokens after the first (not only window 0's own choices).
    assert scored > trials // 3 and later_from_drafts > trials // 10
    # And the drafter's distribution is not the target's: a test that could tell them apart.
    q_joint: dict[tuple[int, ...], float] = {}
    s = Sampling(temperature=TEMPERATURE)
    for seq in joint:
        prob = 1.0
        for i, tok in enumerate(seq):
            prob *= float(target_distribution(drafter_logits(PROMPT + list(seq[:i])).unsqueeze(0), s)[0][tok])
        q_joint[seq] = prob
    q_stat, _ = _chi_square({k: q * trials for k, q in q_joint.items()}, expected)
    assert q_stat > 10 * _chi_square_critical(df)


def test_si_rejection_sampling_is_reproducible_for_a_seed() -> None:
    first, _, _ = _generate("si", range(50), 3)
    again, _, _ = _generate("si", range(50), 3)
    assert first == again
    assert len(set(first)) > 5  # the seed matters
