"""Tiny random-weight model pairs (same tokenizer, Llama architecture) built on the spot, for tests
and as the fallback default when the trained pair is absent. Everything is seeded and offline."""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

from dsi.bpe import train_bpe_tokenizer


@dataclass(frozen=True)
class TinyPairSpec:
    seed: int = 0
    vocab_size: int = 384
    hidden_size: int = 64
    target_layers: int = 2
    drafter_layers: int = 2
    # Relative std of the noise added to the target's weights to make the drafter; 0 = identical.
    drafter_noise: float = 0.03
    # Std of the random init: larger makes the next-token distribution peakier.
    init_std: float = 0.5


def _corpus(max_chars: int = 300_000) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    total = 0
    for name in ("textwrap.py", "string.py", "fractions.py", "functools.py", "heapq.py", "bisect.py"):
        path = stdlib / name
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            texts.append(text)
            total += len(text)
        if total > max_chars:
            break
    texts.append("The quick brown fox jumps over the lazy dog. Hello, world! 0123456789\n")
    return texts


def build_tokenizer(vocab_size: int, out_dirs: list[Path]) -> int:
    """Train a byte-level BPE tokenizer and save it (HF format) into each directory; returns the
    real vocabulary size."""
    fast = train_bpe_tokenizer(_corpus(), vocab_size)
    for d in out_dirs:
        fast.save_pretrained(str(d))
    return len(fast)


def build_tiny_pair(root: Path, spec: TinyPairSpec | None = None) -> tuple[Path, Path]:
    """Write ``root/target`` and ``root/drafter`` (config, safetensors weights, tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = spec or TinyPairSpec()
    root = Path(root)
    target_dir, drafter_dir = root / "target", root / "drafter"
    target_dir.mkdir(parents=True, exist_ok=True)
    drafter_dir.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(spec.vocab_size, [target_dir, drafter_dir])

    def config(layers: int) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=spec.hidden_size,
            intermediate_size=spec.hidden_size * 2,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            initializer_range=spec.init_std,
            eos_token_id=0,
            bos_token_id=0,
            pad_token_id=0,
            tie_word_embeddings=False,
        )

    torch.manual_seed(spec.seed)
    target = LlamaForCausalLM(config(spec.target_layers)).eval()
    target.save_pretrained(str(target_dir))
    drafter = LlamaForCausalLM(config(spec.drafter_layers)).eval()
    gen = torch.Generator().manual_seed(spec.seed + 1)
    with torch.no_grad():
        own = dict(drafter.named_parameters())
        for name, p in target.named_parameters():
            if name in own and own[name].shape == p.shape:
                noise = torch.randn(p.shape, generator=gen) * p.std().clamp_min(1e-3) * spec.drafter_noise
                own[name].copy_(p + noise)
    drafter.save_pretrained(str(drafter_dir))
    return target_dir, drafter_dir
