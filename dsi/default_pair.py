"""Where the built-in default model pair lives: the trained pair shipped in ``dsi/pretrained`` when
present, else a tiny random pair built once and cached on disk."""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from dsi.builtin import PRETRAINED
from dsi.tiny_models import TinyPairSpec, build_tiny_pair


@dataclass(frozen=True)
class DefaultPair:
    target: Path
    drafter: Path
    trained: bool


def cache_dir() -> Path:
    return Path(os.environ.get("DSI_CACHE_DIR", Path.home() / ".cache" / "dsi"))


def _complete(d: Path) -> bool:
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file()


def ensure_default_pair() -> DefaultPair:
    """The default pair's directories, building the random fallback under a file lock if needed."""
    target, drafter = PRETRAINED / "target", PRETRAINED / "drafter"
    if _complete(target) and _complete(drafter):
        return DefaultPair(target, drafter, trained=True)
    root = cache_dir() / "random-pair-v1"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (_complete(root / "target") and _complete(root / "drafter")):
            build_tiny_pair(root, TinyPairSpec(seed=0, vocab_size=512, hidden_size=96, target_layers=4))
    return DefaultPair(root / "target", root / "drafter", trained=False)
