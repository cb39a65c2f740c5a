from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dsi.tiny_models import TinyPairSpec, build_tiny_arch_pair, build_tiny_pair


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Llama target and a perturbed copy as drafter (partial agreement), shared tokenizer."""
    root = tmp_path_factory.mktemp("tiny-pair")
    return build_tiny_pair(root, TinyPairSpec(seed=0, vocab_size=384, hidden_size=64, target_layers=2,
                                              drafter_layers=2, drafter_noise=0.03))


@pytest.fixture(scope="session")
def deep_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A many-layer tiny target (cancellation lands between its 12 layers)."""
    root = tmp_path_factory.mktemp("deep-pair")
    return build_tiny_pair(root, TinyPairSpec(seed=1, vocab_size=384, hidden_size=32, target_layers=12,
                                              drafter_layers=12, drafter_noise=0.03))


@pytest.fixture(scope="session")
def tiny_arch_pairs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Path]]:
    """``get(arch)``: the tiny target/drafter pair of an architecture family in
    ``dsi.tiny_models.ARCHITECTURES`` (sliding window 16 where the family has one), built on first use."""
    built: dict[str, tuple[Path, Path]] = {}

    def get(arch: str) -> tuple[Path, Path]:
        if arch not in built:
            built[arch] = build_tiny_arch_pair(tmp_path_factory.mktemp(f"arch-{arch}"), arch, sliding_window=16)
        return built[arch]

    return get


@pytest.fixture()
def log_dir(tmp_path: Path) -> Path:
    d = tmp_path / "logs"
    d.mkdir()
    return d
