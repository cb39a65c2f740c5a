"""What the public API may say about the deployment behind it: a model's public name instead of its
checkpoint path, and stable labels ('target-1', ...) instead of the targets' network addresses."""

from __future__ import annotations

from pathlib import Path

from dsi.builtin import BUILTIN_NAME as BUILTIN_NAME  # re-exported: the gateway names it too
from dsi.builtin import PRETRAINED


def public_model_name(checkpoint: str) -> str:
    """A checkpoint as clients may see it: 'dsi-default' for the built-in pair, a directory's name for a
    path (never the path), a hub id as it is."""
    path = Path(checkpoint)
    if path.is_absolute() and path.resolve() == (PRETRAINED / "target").resolve():
        return BUILTIN_NAME
    if path.is_absolute() or checkpoint.startswith("."):
        return path.name or checkpoint
    return checkpoint  # a hub id


def builtin_checkpoint(name: str) -> str | None:
    """The built-in target's directory when ``name`` is its public name and it ships in this install."""
    target = PRETRAINED / "target"
    return str(target) if name == BUILTIN_NAME and (target / "config.json").is_file() else None


class EndpointLabels:
    """Stable labels for addresses, numbered in the order they are first seen (an address keeps its
    label for the life of the process, also while it is down)."""

    def __init__(self, prefix: str = "target") -> None:
        self.prefix = prefix
        self._labels: dict[str, str] = {}

    def __call__(self, address: str) -> str:
        if not address:
            return ""
        label = self._labels.get(address)
        if label is None:
            label = f"{self.prefix}-{len(self._labels) + 1}"
            self._labels[address] = label
        return label
