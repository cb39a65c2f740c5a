"""The repository's wiring of the test tiers and the documented limits: `make chaos` runs the chaos
tier (marker `chaos`, registered), `make test` leaves it out, CI (`.ci/run`) runs both, and the
README documents every admission and per-request limit flag of the orchestrator."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

LIMIT_FLAGS = ["--max-active-requests", "--max-queued-requests", "--max-queue-wait-s", "--max-prompt-bytes",
               "--max-stop-strings", "--max-stop-length"]


def make_recipe(target: str) -> list[str]:
    """The recipe lines of a Makefile target (tab-indented lines after `target:`)."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(rf"{re.escape(target)}\s*:(?!=)", line):
            recipe = []
            for body in lines[i + 1:]:
                if not body.startswith("\t"):
                    break
                recipe.append(body.strip())
            return recipe
    raise AssertionError(f"the Makefile has no {target!r} target")


def pytest_runs(recipe: list[str]) -> list[list[str]]:
    """The argument lists of the recipe's pytest runs."""
    runs = []
    for line in recipe:
        words = shlex.split(line)
        for j, word in enumerate(words):
            if word.endswith("pytest"):
                runs.append(words[j + 1:])
    return runs


def marker_expression(args: list[str]) -> str:
    return args[args.index("-m") + 1] if "-m" in args else ""


def test_make_chaos_runs_the_chaos_tier_and_make_test_leaves_it_out() -> None:
    (chaos,) = pytest_runs(make_recipe("chaos"))
    assert marker_expression(chaos) == "chaos"
    (unit_run,) = pytest_runs(make_recipe("test"))
    assert re.fullmatch(r"not chaos( and .*)?|.* and not chaos", marker_expression(unit_run)), unit_run
    phony = next(line for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith(".PHONY"))
    assert "chaos" in phony.split()


def test_the_chaos_marker_is_registered() -> None:
    text = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python 3.11+; the project runs on 3.10)
    section = text.split("[tool.pytest.ini_options]", 1)[1].split("\n[", 1)[0]
    listing = re.search(r"^markers\s*=\s*\[(.*?)\]", section, re.DOTALL | re.MULTILINE)
    assert listing is not None, "pyproject.toml registers no pytest markers"
    markers = re.findall(r'"([^"]*)"', listing.group(1))
    assert any(m.split(":")[0].strip() == "chaos" for m in markers), markers
    # Its tests carry it: a chaos test without the marker would run in `make test`.
    source = (ROOT / "tests" / "chaos" / "test_chaos.py").read_text()
    assert re.search(r"pytestmark\s*=.*pytest\.mark\.chaos", source)


def test_ci_runs_the_tests_and_the_chaos_tier() -> None:
    commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert "make test" in commands
    assert "make chaos" in commands
    assert commands.index("make test") < commands.index("make chaos")  # the quick tier fails first


@pytest.mark.parametrize("flag", LIMIT_FLAGS)
def test_the_readme_documents_the_limit_flag(flag: str) -> None:
    readme = (ROOT / "README.md").read_text()
    assert re.search(rf"`{re.escape(flag)}(\s[^`]*)?`", readme), f"README.md does not document {flag}"


@pytest.mark.parametrize("flag", LIMIT_FLAGS)
def test_the_limit_flags_are_orchestrator_flags(flag: str) -> None:
    """What the README documents is a flag the orchestrator takes (with an environment fallback)."""
    import argparse

    from dsi.services.orchestrator.settings import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert flag in parser._option_string_actions
    assert f"DSI_ORCHESTRATOR_{flag[2:].upper().replace('-', '_')}" in parser.format_help()
