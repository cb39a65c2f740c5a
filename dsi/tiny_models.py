"""Tiny random-weight model pairs (a target and a noisy copy of it as drafter, same tokenizer) built on
the spot: Llama for tests and as the fallback default when the trained pair is absent, and one pair per
architecture family in ``ARCHITECTURES`` for cross-architecture tests. Everything is seeded and offline."""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsi.bpe import train_bpe_tokenizer

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedModel


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
    _copy_with_noise(target, drafter, spec.seed + 1, spec.drafter_noise)
    drafter.save_pretrained(str(drafter_dir))
    return target_dir, drafter_dir


def _copy_with_noise(target: nn.Module, drafter: nn.Module, seed: int, noise: float) -> None:
    """Overwrite every drafter parameter that has a same-shaped target counterpart with that
    parameter plus Gaussian noise of ``noise`` times its std (so the drafter agrees only partly)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        own = dict(drafter.named_parameters())
        for name, p in target.named_parameters():
            if name in own and own[name].shape == p.shape:
                delta = torch.randn(p.shape, generator=gen) * p.std().clamp_min(1e-3) * noise
                own[name].copy_(p + delta)


# Architecture families with a tiny pair builder. "mistral-sw" is Mistral with a (small) sliding
# window on every layer; "gemma2" alternates sliding and global layers; the rest attend globally.
ARCHITECTURES: tuple[str, ...] = ("llama", "gpt2", "qwen2", "mistral-sw", "gpt-neox", "gemma2", "phi")

# Per-family defaults (init_std is the config's initializer_range, as in build_tiny_pair), checked by
# eye so greedy output wanders over the vocabulary instead of repeating one token, and with the
# drafter agreeing with its target's greedy token at about 0.5-0.7 of the positions. gemma2 needs
# more noise (its drafter agreed on 0.9 at 0.03) and another seed (seed 15 repeated one token).
_ARCH_SPECS: dict[str, TinyPairSpec] = {
    "llama": TinyPairSpec(seed=10, hidden_size=64, drafter_noise=0.03, init_std=0.5),
    "gpt2": TinyPairSpec(seed=11, hidden_size=64, drafter_noise=0.03, init_std=0.5),
    "qwen2": TinyPairSpec(seed=12, hidden_size=64, drafter_noise=0.03, init_std=0.5),
    "mistral-sw": TinyPairSpec(seed=13, hidden_size=64, drafter_noise=0.03, init_std=0.5),
    "gpt-neox": TinyPairSpec(seed=14, hidden_size=64, drafter_noise=0.03, init_std=0.5),
    "gemma2": TinyPairSpec(seed=25, hidden_size=64, drafter_noise=0.08, init_std=0.5),
    "phi": TinyPairSpec(seed=16, hidden_size=64, drafter_noise=0.03, init_std=0.5),
}

_HEADS = 4
_KV_HEADS = 2


def default_arch_spec(arch: str) -> TinyPairSpec:
    """The spec ``build_tiny_arch_pair`` uses for ``arch`` when none is given."""
    if arch not in _ARCH_SPECS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    return _ARCH_SPECS[arch]


def _arch_model(arch: str, vocab: int, spec: TinyPairSpec, layers: int, sliding_window: int,
                max_positions: int) -> PreTrainedModel:
    """A randomly initialised (from the current torch seed) causal LM of family ``arch``."""
    import transformers as tf

    hidden = spec.hidden_size
    head_dim = hidden // _HEADS
    special: dict[str, Any] = {"eos_token_id": 0, "bos_token_id": 0, "pad_token_id": 0,
                               "initializer_range": spec.init_std}
    # The Llama-like families share their field names.
    llama_like: dict[str, Any] = {
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": hidden * 2, "num_hidden_layers": layers,
        "num_attention_heads": _HEADS, "num_key_value_heads": _KV_HEADS, "max_position_embeddings": max_positions,
        "tie_word_embeddings": False, **special,
    }
    model: PreTrainedModel
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**llama_like))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**llama_like, use_sliding_window=False))
    elif arch == "mistral-sw":
        model = tf.MistralForCausalLM(tf.MistralConfig(**llama_like, head_dim=head_dim, sliding_window=sliding_window))
    elif arch == "gemma2":
        config = tf.Gemma2Config(
            **llama_like, head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=sliding_window,
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        )
        model = tf.Gemma2ForCausalLM(config)
    elif arch == "phi":
        model = tf.PhiForCausalLM(tf.PhiConfig(**llama_like))
    elif arch == "gpt-neox":
        model = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
            num_attention_heads=_HEADS, max_position_embeddings=max_positions, tie_word_embeddings=False, **special,
        ))
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(
            vocab_size=vocab, n_embd=hidden, n_inner=hidden * 2, n_layer=layers, n_head=_HEADS,
            n_positions=max_positions, **special,
        ))
    else:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    return model.eval()


def build_tiny_arch_pair(
    root: Path,
    arch: str,
    spec: TinyPairSpec | None = None,
    sliding_window: int = 16,
    max_positions: int = 1024,
) -> tuple[Path, Path]:
    """Write ``root/target`` and ``root/drafter`` (config, safetensors weights, the shared BPE tokenizer)
    for architecture family ``arch`` (one of ``ARCHITECTURES``); the drafter is a noisy copy of the
    target. ``sliding_window`` applies to mistral-sw and to gemma2's sliding layers; ``max_positions``
    is the config's position limit. ``spec`` defaults to ``default_arch_spec(arch)``."""
    import torch

    spec = spec or default_arch_spec(arch)
    root = Path(root)
    target_dir, drafter_dir = root / "target", root / "drafter"
    target_dir.mkdir(parents=True, exist_ok=True)
    drafter_dir.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(spec.vocab_size, [target_dir, drafter_dir])
    torch.manual_seed(spec.seed)
    target = _arch_model(arch, vocab, spec, spec.target_layers, sliding_window, max_positions)
    drafter = _arch_model(arch, vocab, spec, spec.drafter_layers, sliding_window, max_positions)
    _copy_with_noise(target, drafter, spec.seed + 1, spec.drafter_noise)
    target.save_pretrained(str(target_dir))
    drafter.save_pretrained(str(drafter_dir))
    return target_dir, drafter_dir
