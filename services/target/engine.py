"""The target's domain logic: score a window of drafts against the target model."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from dsi.services.model.runner import Chunking, Job, ModelRunner
from dsi.services.model.sampling import Sampling, coupled_choice, dense_from_sparse, rejection_verify


@dataclass
class VerifyCall:
    """One window: score positions first_position .. n of the session's sequence, which is the
    first ``prefix_length`` tokens its cache holds (hashing to ``prefix_hash``) then ``token_ids``."""

    session_id: str
    token_ids: list[int]
    first_position: int
    sampling: Sampling
    # Rejection sampling only: (ids, probs) of the drafter's distribution at each draft position.
    draft_probs: list[tuple[list[int], list[float]]] = field(default_factory=list)
    # Fixed-shape forwards (reproducible output in reduced precision); None = one forward over what is new.
    chunking: Chunking | None = None
    prefix_length: int = 0
    prefix_hash: int = 0


@dataclass
class VerifyResult:
    token_ids: list[int]
    cached_tokens: int
    queue_s: float
    compute_s: float


class TargetEngine:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    async def verify(self, call: VerifyCall) -> VerifyResult:
        runner = self.runner
        runner.counters.calls += 1

        jobs: list[Job] = []

        def job(j: Job) -> tuple[list[int], int]:
            jobs.append(j)
            seq = call.token_ids
            if call.prefix_length:
                seq = runner.held_prefix(call.session_id, call.prefix_length, call.prefix_hash) + seq
            logits, cached = runner.forward(
                j, call.session_id, seq, call.first_position - 1, call.chunking, known_prefix=call.prefix_length
            )
            positions = list(range(call.first_position, len(seq) + 1))
            s = call.sampling
            if s.rejection and not s.greedy:
                vocab = logits.shape[-1]
                q = [dense_from_sparse(ids, probs, vocab, logits.device) for ids, probs in call.draft_probs]
                tokens = rejection_verify(logits, seq[call.first_position :], q, call.first_position, s)
            else:
                tokens = coupled_choice(logits, positions, s)
            return tokens, cached

        try:
            tokens, cached = await runner.run(job)
        except asyncio.CancelledError:
            runner.counters.cancelled += 1
            raise
        # Read after the run: compute_s includes the rest of an emulated latency.
        return VerifyResult(tokens, cached, jobs[0].queue_s, jobs[0].compute_s)

    async def release(self, session_id: str) -> bool:
        return await self.runner.release(session_id)
