"""Greedy acceptance of a drafter/target pair, as the built-in pair's model card defines it."""

from __future__ import annotations

from typing import Any


def greedy_acceptance(target: Any, drafter: Any, prompts: list[list[int]], gen_len: int) -> tuple[int, int]:
    """(matches, total): the target generates gen_len tokens greedily from each prompt (prompts of
    equal length, batched); at each step the drafter's greedy token on the same prefix is compared
    with the target's."""
    import torch
    from transformers import DynamicCache

    x = torch.tensor(prompts, dtype=torch.long)  # [batch, prompt_len]
    plen = x.size(1)
    with torch.inference_mode():
        cache = DynamicCache(config=target.config)
        out = target(x, cache=cache, use_cache=True)
        seq = x
        for i in range(gen_len):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # [batch, 1]
            seq = torch.cat([seq, nxt], dim=1)
            if i + 1 < gen_len:
                out = target(nxt, cache=cache, use_cache=True)
        draft = drafter(seq[:, :-1]).logits[:, plen - 1 :].argmax(-1)  # [batch, gen_len]
    match = draft == seq[:, plen:]
    return int(match.sum()), match.numel()
