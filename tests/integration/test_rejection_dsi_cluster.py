"""Rejection-sampling verification in DSI mode through the real services, beyond the first token.

``verification="rejection"`` promises losslessness in distribution, not token for token (README,
"Sampling"), so DSI is not compared with SI token by token here. What can be checked on each output:
with top_k=3 every token must be one of the target's 3 most likely given the tokens before it (a
draft outside them has p = 0 and must always be rejected), and the drafter's top 3 differ from the
target's at most positions, so drafts accepted by the drafter's q alone would show. Over all the
tokens after the first, the probability the target gave each chosen token must match its
expectation under the target (a z-test). The joint distribution over several tokens is checked
exactly, on synthetic models, in ``tests/unit/test_rejection_dsi.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dsi.client import Client
from dsi.services.model.sampling import Sampling, target_distribution
from tests.integration.procs import start_cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOP_K = 3
TOKENS = 5


@pytest.fixture(scope="module")
def orchestrator(tiny_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    """Two targets slowed to 15 ms a forward (the drafter, unslowed, runs ahead: windows carry
    drafts), a drafter, an orchestrator."""
    target_dir, drafter_dir = tiny_pair
    with start_cluster(target_dir, drafter_dir, tmp_path_factory.mktemp("rejection-logs"),
                       target_args=["--emulate-latency-ms", "15:15"]) as c:
        yield c.orchestrator.address


def test_dsi_rejection_sampling_keeps_every_token_in_the_targets_distribution(orchestrator, tiny_pair) -> None:
    target_dir, drafter_dir = tiny_pair
    tok = AutoTokenizer.from_pretrained(str(target_dir))
    target = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()
    drafter = AutoModelForCausalLM.from_pretrained(str(drafter_dir), dtype=torch.float32).eval()
    s = Sampling(temperature=1.0, top_k=TOP_K)
    outputs = []
    with Client(orchestrator, timeout=120) as client:
        for i, prompt in enumerate(["import os\n", "def fibonacci(n):", "class Foo:"]):
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            for seed in range(50):
                r = client.generate(ids, max_new_tokens=TOKENS, mode="dsi", temperature=1.0, top_k=TOP_K,
                                    seed=1000 * i + seed, verification="rejection", lookahead=2, ignore_eos=True)
                assert len(r.token_ids) == TOKENS and r.stats["mode"] == "dsi"
                outputs.append((ids, r))
    outside = drafter_differs = later_from_drafts = 0
    z_num = z_var = 0.0
    for ids, r in outputs:
        seq = torch.tensor([ids + r.token_ids])
        with torch.no_grad():
            rows = target(seq).logits[0, len(ids) - 1 : -1].float()  # [TOKENS, vocab]: row i chooses token i
            drafter_rows = drafter(seq).logits[0, len(ids) - 1 : -1].float()
        p = target_distribution(rows, s)  # [TOKENS, vocab]
        q = target_distribution(drafter_rows, s)
        for i, token in enumerate(r.token_ids):
            outside += bool(p[i, token] == 0)
            drafter_differs += bool(((q[i] > 0) & (p[i] == 0)).any())
            if i >= 1:
                later_from_drafts += r.tokens[i].from_draft
                # p(X) for X ~ p has mean sum p^2 and variance sum p^3 - (sum p^2)^2.
                mean = float((p[i] ** 2).sum())
                z_num += float(p[i, token]) - mean
                z_var += float((p[i] ** 3).sum()) - mean**2
    total = len(outputs) * TOKENS
    assert outside == 0, f"{outside} of {total} tokens have probability 0 under the target"
    assert drafter_differs > total // 2  # the check could fail: the drafter often proposes outside them
    assert later_from_drafts > 20  # drafts were accepted by rejection sampling after the first token
    z = z_num / z_var**0.5
    assert abs(z) < 4.0, z
