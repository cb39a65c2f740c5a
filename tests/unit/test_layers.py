"""The import layers hold (docs/architecture.md, "Layers"): every import in dsi/ and services/, at the
top of a module or inside a function, is read with ``ast`` and checked against the rules below.

    protocol      dsi.v1                                   generated code; imports nothing of ours
    base          dsi.builtin, dsi.envflags, dsi.tls, dsi.client   SDK and shared constants;
                  dsi.sim.model                            the DSI time model (numpy)
    runtime       services.runtime                         model-free serving plumbing
    domain        services.orchestrator, services.gateway  model-free: no torch, no model code
    model         services.model, services.target, services.drafter
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
MODEL_FREE_DOMAIN = ("services.orchestrator", "services.gateway")
MODEL = ("services.model", "services.target", "services.drafter")

# Lazy imports of a heavy library that a model-free module may make, each with its reason.
ALLOWED_HEAVY = {
    # A checkpoint without tokenizer.json: the only way to read a slow tokenizer (logged as a warning).
    ("services.orchestrator.tokenizer", "transformers"),
    # The gateway (its own process, not the orchestrator) renders chat templates with transformers.
    ("services.gateway.chat", "transformers"),
}


def _within(module: str, prefixes: tuple[str, ...] | str) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def layer(module: str) -> str:
    if _within(module, "dsi.v1"):
        return "protocol"
    if _within(module, BASE) or module == "dsi.sim":  # the package's __init__ imports only the model
        return "base"
    if _within(module, "services.runtime"):
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
    if _within(dst, ("dsi", "services")):
        to = layer(dst)
        if ORDER.index(to) > ORDER.index(src):
            out.append(f"{where}: the {src} layer may not import the {to} layer")
        for a, b in (("services.target", "services.drafter"), ("services.drafter", "services.target"),
                     ("services.orchestrator", "services.gateway"), ("services.gateway", "services.orchestrator")):
            if _within(imp.module, a) and _within(dst, b):
                out.append(f"{where}: {a} and {b} are separate services")
    return out


def product_modules() -> dict[str, str]:
    out = {}
    for top in ("dsi", "services"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path.read_text(encoding="utf-8")
    return out


def test_every_import_respects_the_layers() -> None:
    modules = product_modules()
    assert "services.orchestrator.scheduler" in modules and "dsi.v1.target_pb2" in modules
    found = [v for name, source in modules.items() for imp in imports_of(name, source) for v in violations(imp)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("services.orchestrator.pool", "import torch\n"),
        ("services.orchestrator.service", "def f():\n    from transformers import AutoTokenizer\n"),
        ("services.runtime.validation", "from services.model.sampling import Sampling\n"),
        ("services.orchestrator.server", "from dsi.default_pair import ensure_default_pair\n"),
        ("services.model.server", "from dsi import tiny_models\n"),
        ("services.target.engine", "from services.drafter.engine import DrafterEngine\n"),
        ("dsi.client", "from services.orchestrator.service import Orchestrator\n"),
        ("dsi.cluster", "from tests.integration.procs import start_service\n"),
        ("dsi.v1.common_pb2", "import dsi.client\n"),
    ],
)
def test_the_check_catches_a_forbidden_import(module: str, source: str) -> None:
    found = [v for imp in imports_of(module, source) for v in violations(imp)]
    assert found, f"{module}: {source!r} should violate the layers"


def test_allowed_imports_pass_the_check() -> None:
    for module, source in [
        ("services.orchestrator.pool", "from dsi.v1 import target_pb2\n"
                                       "from services.runtime.errors import Unavailable\n"),
        ("services.target.engine", "import torch\nfrom services.model.sampling import coupled_choice\n"),
        ("dsi.cli", "from services.orchestrator.settings import add_arguments\n"),
        ("services.orchestrator.tokenizer", "def f():\n    from transformers import AutoTokenizer\n"),
    ]:
        assert not [v for imp in imports_of(module, source) for v in violations(imp)], source
