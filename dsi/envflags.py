"""Command-line flags that fall back to environment variables, and say so in ``--help``."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def add_flag(
    parser: argparse.ArgumentParser | Any,
    *names: str,
    env: str,
    default: Any = None,
    type: Callable[[str], Any] | None = str,  # noqa: A002 - mirrors argparse
    help: str = "",  # noqa: A002 - mirrors argparse
    **kwargs: Any,
) -> argparse.Action:
    """Add a flag whose default comes from ``env`` when that variable is set.

    The help text ends with ``[env: NAME, default: X]`` so that ``--help`` documents both ways of
    setting it. ``action="store_true"`` flags read ``1/true/yes/on`` from the environment.
    """
    action = kwargs.get("action")
    raw = os.environ.get(env)
    if type is not None:
        kwargs["type"] = type
    value: Any
    if action == "store_true":
        value = _parse_bool(raw) if raw is not None else bool(default)
        kwargs.pop("type", None)
        return parser.add_argument(*names, default=value, help=f"{help} [env: {env}]", **kwargs)
    if action == "append":
        value = raw.split(",") if raw else default
        return parser.add_argument(*names, default=value, help=f"{help} [env: {env} (comma-separated)]", **kwargs)
    value = default
    if raw is not None:
        try:
            value = type(raw) if type is not None else raw
        except (ValueError, argparse.ArgumentTypeError) as exc:
            parser.error(f"environment variable {env}={raw!r} is invalid: {exc}")
    shown = "" if default in (None, "") else f", default: {default}"
    return parser.add_argument(*names, default=value, help=f"{help} [env: {env}{shown}]", **kwargs)
