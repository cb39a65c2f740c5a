"""The drafter's domain logic: propose tokens one at a time from a prefix.

A benchmark-only *oracle* mode (``oracle_acceptance`` = a) serves the target model and proposes its
greedy token with probability a and its second-best token otherwise, independently per position,
to sweep acceptance rates in benchmarks. It is labelled as such in ``Info`` and in benchmark output.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import torch

from services.model.runner import Job, ModelRunner
from services.model.sampling import (
    Sampling,
    coupled_choice,
    draft_sample,
    sparse_from_dense,
    uniform_noise,
)

_SALT_ORACLE = 0x3C6EF372


@dataclass
class DraftToken:
    token_id: int
    position: int
    probs: tuple[list[int], list[float]] | None = None


class DrafterEngine:
    def __init__(self, runner: ModelRunner, oracle_acceptance: float = 0.0) -> None:
        self.runner = runner
        self.oracle_acceptance = oracle_acceptance

    def _step(self, job: Job, session_id: str, seq: list[int], s: Sampling, return_probs: bool) -> DraftToken:
        logits, _ = self.runner.forward(job, session_id, seq, len(seq) - 1)  # [1, vocab]
        position = len(seq)
        if self.oracle_acceptance > 0:
            top2 = torch.topk(logits[0], 2).indices.tolist()
            u = float(uniform_noise(s.seed, position, 1, _SALT_ORACLE)[0])
            return DraftToken(top2[0] if u < self.oracle_acceptance else top2[1], position)
        if return_probs and not s.greedy:
            token, q = draft_sample(logits[0], position, s)
            return DraftToken(token, position, sparse_from_dense(q))
        return DraftToken(coupled_choice(logits, [position], s)[0], position)

    async def draft(
        self, session_id: str, token_ids: list[int], max_tokens: int, sampling: Sampling, return_probs: bool
    ) -> AsyncGenerator[DraftToken, None]:
        """Yield up to max_tokens drafts continuing token_ids; stops before the next token on cancel."""
        runner = self.runner
        runner.counters.calls += 1
        seq = list(token_ids)
        try:
            for _ in range(max_tokens):
                step = functools.partial(
                    self._step, session_id=session_id, seq=list(seq), s=sampling, return_probs=return_probs
                )
                token = await runner.run(step)
                seq.append(token.token_id)
                yield token
        except (asyncio.CancelledError, GeneratorExit):
            runner.counters.cancelled += 1
            raise

    async def release(self, session_id: str) -> bool:
        return await self.runner.release(session_id)
