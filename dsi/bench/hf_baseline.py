"""In-process HuggingFace baselines on the same prompts: plain greedy ``generate()`` and assisted
generation (``generate(assistant_model=drafter)``, HF's own speculative decoding)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def run_hf_baselines(
    target: Path,
    drafter: Path,
    prompts: Sequence[str],
    max_new_tokens: int,
    threads: int = 1,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """ms/token (wall time / new tokens, median over prompts) of both baselines.

    ``min_new_tokens`` keeps EOS from ending a run early, as ``ignore_eos`` does in the system.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # deprecation chatter about generation kwargs
    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(str(target))
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32).eval()
    assistant = AutoModelForCausalLM.from_pretrained(str(drafter), dtype=torch.float32).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def once(prompt: str, assisted: bool, n: int) -> tuple[float, int]:
        enc = tok(prompt, return_tensors="pt")
        kwargs: dict[str, Any] = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad)
        if assisted:
            kwargs["assistant_model"] = assistant
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kwargs)
            wall = time.perf_counter() - t0
        return wall, int(out.shape[1] - enc["input_ids"].shape[1])  # out: [1, prompt + new]

    result: dict[str, Any] = {"threads": threads}
    for name, assisted in (("generate", False), ("assisted", True)):
        once(prompts[0], assisted, 4)  # warm-up
        per_prompt = []
        for prompt in prompts:
            wall, n = once(prompt, assisted, max_new_tokens)
            per_prompt.append(wall * 1000 / max(1, n))
            progress(f"hf {name}")
        result[name] = {
            "ms_per_token": statistics.median(per_prompt),
            "noise_ms": (max(per_prompt) - min(per_prompt)) / 2,
            "per_prompt_ms_per_token": per_prompt,
        }
    return result
