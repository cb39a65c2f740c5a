"""Where the built-in model pair ships and the name clients know it by. Plain constants, no imports of
model code: the model-free services (orchestrator, gateway) read them too."""

from __future__ import annotations

from pathlib import Path

# The trained tiny pair shipped with the package (``target/`` and ``drafter/``).
PRETRAINED = Path(__file__).parent / "pretrained"

# The public name of the built-in pair's target (what `dsi up` and the images serve by default).
BUILTIN_NAME = "dsi-default"
