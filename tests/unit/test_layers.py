"""The import layers hold (docs/architecture.md, "Layers"): every import in dsi/ and services/, at the
top of a module or inside a function, is read with ``ast`` and checked against the rules below.

    protocol      dsi.v1                                   generated code; imports nothing of ours
    base          dsi.builtin, dsi.envflags, dsi.tls, dsi.client   SDK and shared constants;
                  dsi.sim.model                            the DSI time model (numpy)
    runtime       dsi.services.runtime                         model-free serving plumbing
    domain        dsi.services.orchestrator, dsi.services.gateway  model-free: no torch, no model code
    model         dsi.services.model, dsi.services.target, dsi.services.drafter
    tools         dsi.cli, dsi.cluster, dsi.bench, dsi.sim, dsi.demo, dsi.default_pair, ...

A layer imports only layers above it in this list (and itself); the model services do not import each
other; nothing imports the tests; torch and transformers stay out of the model-free layers.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers")
# dsi.sim.model: the DSI time model (numpy only), run by the orchestrator's automatic lookahead too.
BASE = ("dsi.builtin", "dsi.envflags", "dsi.tls", "dsi.client", "dsi.sim.model")
MODEL_FREE_DOMAIN = ("dsi.services.orchestrator", "dsi.services.gateway")
MODEL = ("dsi.services.model", "dsi.services.target", "dsi.services.drafter")

# Lazy imports of a heavy library that a model-free module may make, each with its reason.
ALLOWED_HEAVY = {
    # A checkpoint without tokenizer.json: the only way to read a slow tokenizer (logged as a warning).
    ("dsi.services.orchestrator.tokenizer", "transformers"),
    # The gateway (its own process, not the orchestrator) renders chat templates with transformers.
    ("dsi.services.gateway.chat", "transformers"),
}


def _within(module: str, prefixes: tuple[str, ...] | str) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def layer(module: str) -> str:
    if _within(module, "dsi.v1"):
        return "protocol"
    if _within(module, BASE) or module == "dsi.sim":  # the package's __init__ imports only the model
        return "base"
    if _within(module, "dsi.services.runtime"):
        return "runtime"
    if _within(module, MODEL_FREE_DOMAIN):
        return "domain"
    if _within(module, MODEL):
        return "model"
    return "tools"


ORDER = ["protocol", "base", "runtime", "domain", "model", "tools"]


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # what it imports (absolute)
    line: int
    lazy: bool  # inside a function


def imports_of(module: str, source: str) -> list[Import]:
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend(Import(module, a.name, child.lineno, lazy) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append(Import(module, child.module, child.lineno, lazy))
                # `from dsi import client` imports dsi.client
                found.extend(Import(module, f"{child.module}.{a.name}", child.lineno, lazy) for a in child.names
                             if (ROOT / child.module.replace(".", "/") / f"{a.name}.py").is_file())
            visit(child, inner)

    visit(ast.parse(source), False)
    return found


def violations(imp: Import) -> list[str]:
    src, dst = layer(imp.module), imp.target
    where = f"{imp.module}:{imp.line} imports {dst}"
    out = []
    if _within(dst, "tests"):
        out.append(f"{where}: product code never imports the tests")
    if _within(dst, HEAVY) and src in ("protocol", "base", "runtime", "domain"):
        if not (imp.lazy and (imp.module, dst.split(".")[0]) in ALLOWED_HEAVY):
            out.append(f"{where}: the {src} layer is model-free (no torch or transformers)")
    if _within(dst, "services"):
        out.append(f"{where}: the services are the package dsi.services (no top-level `services` is installed)")
    if _within(dst, "dsi"):
        to = layer(dst)
        if ORDER.index(to) > ORDER.index(src):
            out.append(f"{where}: the {src} layer may not import the {to} layer")
        t, d, o, g = (f"dsi.services.{name}" for name in ("target", "drafter", "orchestrator", "gateway"))
        for a, b in ((t, d), (d, t), (o, g), (g, o)):
            if _within(imp.module, a) and _within(dst, b):
                out.append(f"{where}: {a} and {b} are separate services")
    return out


def product_modules() -> dict[str, str]:
    """Every module by its import name: dsi/ (but its services link) and services/ as dsi.services."""
    out = {}
    for top, package in (("dsi", "dsi"), ("services", "dsi.services")):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT / top).with_suffix("")
            if top == "dsi" and rel.parts[0] == "services":
                continue  # the link to services/, walked as such
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join((package, *parts))] = path.read_text(encoding="utf-8")
    return out


def test_the_services_install_under_the_projects_namespace() -> None:
    link = ROOT / "dsi" / "services"
    assert link.is_symlink() and link.resolve() == (ROOT / "services").resolve()
    assert 'include = ["dsi*"]' in (ROOT / "pyproject.toml").read_text()


def test_every_import_respects_the_layers() -> None:
    modules = product_modules()
    assert "dsi.services.orchestrator.scheduler" in modules and "dsi.v1.target_pb2" in modules
    found = [v for name, source in modules.items() for imp in imports_of(name, source) for v in violations(imp)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("dsi.services.orchestrator.pool", "import torch\n"),
        ("dsi.services.orchestrator.service", "def f():\n    from transformers import AutoTokenizer\n"),
        ("dsi.services.runtime.validation", "from dsi.services.model.sampling import Sampling\n"),
        ("dsi.services.orchestrator.server", "from dsi.default_pair import ensure_default_pair\n"),
        ("dsi.services.model.server", "from dsi import tiny_models\n"),
        ("dsi.services.target.engine", "from dsi.services.drafter.engine import DrafterEngine\n"),
        ("dsi.client", "from dsi.services.orchestrator.service import Orchestrator\n"),
        ("dsi.cluster", "from tests.integration.procs import start_service\n"),
        ("dsi.v1.common_pb2", "import dsi.client\n"),
        ("dsi.services.orchestrator.pool", "from services.runtime.errors import Unavailable\n"),
    ],
)
def test_the_check_catches_a_forbidden_import(module: str, source: str) -> None:
    found = [v for imp in imports_of(module, source) for v in violations(imp)]
    assert found, f"{module}: {source!r} should violate the layers"


def test_allowed_imports_pass_the_check() -> None:
    for module, source in [
        ("dsi.services.orchestrator.pool", "from dsi.v1 import target_pb2\n"
                                       "from dsi.services.runtime.errors import Unavailable\n"),
        ("dsi.services.target.engine", "import torch\nfrom dsi.services.model.sampling import coupled_choice\n"),
        ("dsi.cli", "from dsi.services.orchestrator.settings import add_arguments\n"),
        ("dsi.services.orchestrator.tokenizer", "def f():\n    from transformers import AutoTokenizer\n"),
    ]:
        assert not [v for imp in imports_of(module, source) for v in violations(imp)], source
