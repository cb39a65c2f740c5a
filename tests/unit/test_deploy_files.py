"""The deployment files agree with the code: every compose command and Kubernetes container is
accepted by the CLI's own parser with the environment it will run with (image ENV + service env),
health checks probe the port each service binds, only the orchestrator and the HTTP gateway are
published, every GPU
service reserves its own device, the CPU override removes them, and the Dockerfile is a slim,
multi-stage, non-root image whose HEALTHCHECK uses ``dsi health``. The secure variants (compose
override, Kubernetes overlay) give each service only its own certificate files, wire TLS so that each
side trusts the CA that signed the other's certificate, probe over TLS, and the NetworkPolicies let
only the orchestrator reach the model services."""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shlex
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml

from dsi.cluster import CERT_FILES

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
COMPOSE_SECURE = ROOT / "docker-compose.secure.yml"
DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "deploy" / "kubernetes"
K8S_SECURE = K8S / "secure"
MODEL_ROLES = ("target", "drafter")
Services = dict[str, dict[str, Any]]

# --- secrets: the files scripts/make-certs.sh writes, and which CA signed which certificate ---------

SECRET_FILES = (*CERT_FILES, "api-keys")
SIGNED_BY = {"ca.crt": {"orchestrator.crt", "client.crt"},
             "internal-ca.crt": {"target.crt", "drafter.crt", "orchestrator-client.crt"}}
# Where a container sees its secrets: compose secrets, the Kubernetes overlay's Secret volumes.
SECRET_DIRS = ("/run/secrets/", "/etc/dsi/")
_FAKE_SECRETS = tempfile.TemporaryDirectory(prefix="dsi-fake-secrets-")
FAKE_SECRETS = Path(_FAKE_SECRETS.name)
for _name in SECRET_FILES:  # what the settings read at start-up: a PEM-looking file, a key file
    (FAKE_SECRETS / _name).write_text("key\n" if _name == "api-keys" else "-----BEGIN FAKE-----\n")


def secret_name(path: str) -> str | None:
    """The make-certs.sh file a container path stands for, or None when it is no secret's path."""
    if not path.startswith(SECRET_DIRS):
        return None
    name = path.rsplit("/", 1)[1]
    assert name in SECRET_FILES, f"{path}: not a file scripts/make-certs.sh writes"
    assert not name.endswith("ca.key"), f"{path}: a CA's key must never be mounted"
    return name


def localize(env: Mapping[str, str]) -> dict[str, str]:
    """The environment with secrets' container paths replaced by stand-in files, so that the settings
    (which read certificates at start-up) can be built here."""
    out = {}
    for key, value in env.items():
        name = secret_name(value)
        out[key] = str(FAKE_SECRETS / name) if name else value
    return out


def signs(ca_path: str, cert_path: str) -> bool:
    ca, cert = secret_name(ca_path), secret_name(cert_path)
    return ca is not None and cert in SIGNED_BY.get(ca, set())


def check_tls_wiring(envs: Mapping[str, Mapping[str, str]], where: str) -> None:
    """Every TLS peer trusts the CA that signed the other side's certificate (``envs``: role -> env)."""
    orch, gateway = envs["orchestrator"], envs["gateway"]
    for role in MODEL_ROLES:
        env, prefix = envs[role], f"DSI_{role.upper()}_"
        assert secret_name(env[prefix + "TLS_CERT"]) == f"{role}.crt", f"{where} {role}"
        assert secret_name(env[prefix + "TLS_KEY"]) == f"{role}.key", f"{where} {role}"
        # Mutual TLS: the model service accepts the orchestrator's client certificate, and no other CA's.
        assert signs(env[prefix + "TLS_CLIENT_CA"], orch["DSI_ORCHESTRATOR_UPSTREAM_TLS_CERT"]), f"{where} {role}"
        assert not signs(env[prefix + "TLS_CLIENT_CA"], "/run/secrets/client.crt"), f"{where}: clients reach {role}"
        assert signs(orch["DSI_ORCHESTRATOR_UPSTREAM_TLS_CA"], env[prefix + "TLS_CERT"]), f"{where} {role}"
        # Its health check presents its own certificate to itself.
        assert signs(env["DSI_CA"], env[prefix + "TLS_CERT"]) and env["DSI_CERT"] == env[prefix + "TLS_CERT"]
        assert env["DSI_KEY"] == env[prefix + "TLS_KEY"]
    assert secret_name(orch["DSI_ORCHESTRATOR_UPSTREAM_TLS_KEY"]) == "orchestrator-client.key"
    assert signs(gateway["DSI_GATEWAY_ORCHESTRATOR_CA"], orch["DSI_ORCHESTRATOR_TLS_CERT"]), where
    assert signs(orch["DSI_CA"], orch["DSI_ORCHESTRATOR_TLS_CERT"]), f"{where}: the orchestrator's health check"
    assert secret_name(gateway["DSI_GATEWAY_ORCHESTRATOR_CERT"]) == "client.crt"
    for env, var in ((orch, "DSI_ORCHESTRATOR_API_KEY_FILE"), (gateway, "DSI_GATEWAY_API_KEY_FILE"),
                     (gateway, "DSI_GATEWAY_ORCHESTRATOR_API_KEY_FILE")):
        assert secret_name(env[var]) == "api-keys", f"{where}: {var}"


# --- compose loading: YAML with compose's tags, ${VAR:-default} interpolation, override merging ---


class Reset:
    """Compose's ``!reset`` (drop the base file's value) and ``!override`` (replace it whole)."""

    def __init__(self, value: Any, replace: bool) -> None:
        self.value = value
        self.replace = replace


class ComposeLoader(yaml.SafeLoader):
    pass


def _tag(replace: bool):  # type: ignore[no-untyped-def]
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> Reset:
        if isinstance(node, yaml.MappingNode):
            value: Any = loader.construct_mapping(node, deep=True)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_scalar(node)  # type: ignore[arg-type]
        return Reset(value, replace)

    return construct


ComposeLoader.add_constructor("!reset", _tag(replace=False))
ComposeLoader.add_constructor("!override", _tag(replace=True))

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _closing_brace(text: str, start: int) -> int:
    depth = 1
    i = start
    while i < len(text):
        if text.startswith("${", i):
            depth, i = depth + 1, i + 2
            continue
        if text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise AssertionError(f"unclosed ${{ in {text!r}")


def _expand(body: str, env: Mapping[str, str]) -> str:
    """One ${...}: NAME, NAME:-default, NAME-default, NAME:?error, NAME:+alternative; the default may
    itself hold ${...} (compose's nested interpolation)."""
    m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?", body, re.S)
    assert m, f"bad interpolation ${{{body}}}"
    name, op, arg = m.group(1), m.group(2), m.group(3) or ""
    current = env.get(name)
    if op in (":-", "-"):
        unset = current is None or (op == ":-" and current == "")
        return _substitute(arg, env) if unset else str(current)
    if op in (":?", "?"):
        if current is None or (op == ":?" and current == ""):
            raise AssertionError(f"required variable {name} is unset: {arg}")
        return current
    if op in (":+", "+"):
        return _substitute(arg, env) if current else ""
    return current or ""


def _substitute(text: str, env: Mapping[str, str]) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            end = _closing_brace(text, i + 2)
            out.append(_expand(text[i + 2 : end], env))
            i = end + 1
        elif text[i] == "$" and (m := _NAME.match(text, i + 1)):
            out.append(env.get(m.group(0), ""))
            i = m.end()
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable substitution, enough for these files: $$, $VAR, ${VAR}, ${VAR:-default}
    (nested defaults too)."""
    if isinstance(value, str):
        return _substitute(value, env)
    if isinstance(value, Reset):
        return Reset(interpolate(value.value, env), value.replace)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def merge(base: Any, override: Any, key: str = "") -> Any:
    """Compose's merge of an override file, simplified: mappings merge key by key, sequences are
    appended to (so only ``!reset`` removes a base file's GPU reservation), scalars and the
    command-like sequences are replaced."""
    if isinstance(override, Reset):
        return override.value if override.replace else _RESET
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, value in override.items():
            merged = merge(base.get(k), value, k)
            if merged is _RESET:
                out.pop(k, None)
            else:
                out[k] = merged
        return out
    if isinstance(base, list) and isinstance(override, list) and key not in _REPLACED_SEQUENCES:
        return base + [item for item in override if item not in base]
    return override


_REPLACED_SEQUENCES = {"command", "entrypoint", "test"}
_RESET = object()


def load_compose(*files: Path, env: Mapping[str, str] | None = None) -> Services:
    model: dict[str, Any] = {}
    for f in files:
        doc = yaml.load(f.read_text(), Loader=ComposeLoader)
        model = merge(model, interpolate(doc, env or {}))
    return model["services"]


def compose_role(service: Mapping[str, Any]) -> str:
    command = service["command"]
    assert isinstance(command, list) and command[:1] == ["serve"], command
    return str(command[1])


def compose_env(service: Mapping[str, Any]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, None) for item in raw)
    return {k: str(v) for k, v in raw.items() if v is not None}  # None: passed through from the host


def reserved_devices(service: Mapping[str, Any]) -> list[dict[str, Any]]:
    deploy = service.get("deploy") or {}
    return list(((deploy.get("resources") or {}).get("reservations") or {}).get("devices") or [])


def parse_duration(text: str | int | float) -> float:
    if isinstance(text, (int, float)):
        return float(text)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(a + b for a, b in parts) == text, f"bad duration {text!r}"
    return sum(float(a) * units[b] for a, b in parts)


# --- the Dockerfile ---------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


def image_env() -> dict[str, str]:
    """The DSI_* variables the runtime stage sets with ENV KEY=VALUE."""
    env: dict[str, str] = {}
    for keyword, rest in dockerfile_stages()[-1]:
        if keyword == "ENV":
            for token in shlex.split(rest):
                key, sep, value = token.partition("=")
                assert sep, f"use ENV KEY=VALUE, got {token!r}"
                env[key] = value
    return {k: v for k, v in env.items() if k.startswith("DSI_")}


# --- the CLI ----------------------------------------------------------------------------------------


def parse_cli(args: list[str], env: Mapping[str, str], where: str) -> argparse.Namespace:
    """Parse args with the project's parser as the container would: its DSI_* environment only."""
    from dsi.cli import build_parser

    clean = {k: v for k, v in os.environ.items() if not k.startswith("DSI_")}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        try:
            return build_parser().parse_args(args)
        except SystemExit as exc:
            pytest.fail(f"{where}: `dsi {' '.join(args)}` is refused by the CLI (exit {exc.code}) with {env}")


def validate_settings(ns: argparse.Namespace, where: str) -> Any:
    """Build the service's typed settings, which also checks what the parser alone does not."""
    try:
        if ns.role == "orchestrator":
            from dsi.services.orchestrator.settings import settings_from_args

            return settings_from_args(ns)
        if ns.role == "gateway":
            from dsi.services.gateway.settings import settings_from_args as gateway_settings

            return gateway_settings(ns)
        from dsi.services.model.settings import model_server_settings

        return model_server_settings(ns, ns.role)
    except SystemExit as exc:
        pytest.fail(f"{where}: settings refused: {exc}")


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


# --- compose tests ----------------------------------------------------------------------------------


def compose_variants() -> Iterator[tuple[str, Services]]:
    yield "gpu", load_compose(COMPOSE)
    yield "cpu", load_compose(COMPOSE, COMPOSE_CPU)
    yield "gpu-secure", load_compose(COMPOSE, COMPOSE_SECURE)
    yield "cpu-secure", load_compose(COMPOSE, COMPOSE_CPU, COMPOSE_SECURE)


@pytest.fixture(scope="module", params=["gpu", "cpu", "gpu-secure", "cpu-secure"])
def compose(request: pytest.FixtureRequest) -> Services:
    return dict(compose_variants())[request.param]


def service_settings(name: str, service: Mapping[str, Any]) -> tuple[argparse.Namespace, Any]:
    env = localize({**image_env(), **compose_env(service)})
    ns = parse_cli(list(service["command"]), env, f"compose service {name}")
    return ns, validate_settings(ns, f"compose service {name}")


def test_compose_has_two_targets_a_drafter_and_an_orchestrator(compose: Services) -> None:
    roles = sorted(compose_role(s) for s in compose.values())
    assert roles == ["drafter", "gateway", "orchestrator", "target", "target"]


def test_every_compose_command_is_accepted_and_binds_every_interface(compose: Services) -> None:
    for name, service in compose.items():
        ns, settings = service_settings(name, service)
        assert settings.server.host == "0.0.0.0", f"{name} must bind 0.0.0.0 inside its container"
        assert settings.server.port > 0, f"{name} needs a fixed port"


def test_every_service_health_checks_its_own_port_with_dsi_health(compose: Services) -> None:
    for name, service in compose.items():
        check = service.get("healthcheck")
        assert check and not check.get("disable"), f"{name} has no healthcheck"
        test = check["test"]
        assert test[0] in ("CMD", "CMD-SHELL"), test
        argv = test[1:] if test[0] == "CMD" else shlex.split(test[1])
        if compose_role(service) == "gateway":  # HTTP: GET /health, ready while the orchestrator is
            _, settings = service_settings(name, service)
            assert argv[:2] == ["python", "-c"] and f"http://127.0.0.1:{settings.server.port}/health" in argv[2]
            continue
        assert argv[:2] == ["dsi", "health"], f"{name}: {test}"
        health = parse_cli(argv[1:], {}, f"{name} healthcheck")
        host, port = host_port(health.address)
        ns, settings = service_settings(name, service)
        assert (host, port) == ("127.0.0.1", settings.server.port), f"{name} probes {health.address}"
        assert parse_duration(check["timeout"]) > health.timeout_s, f"{name}: the check's deadline must fit"
        if compose_role(service) in MODEL_ROLES:
            assert parse_duration(check["start_period"]) >= 120, f"{name}: start_period must cover loading"


def test_only_the_orchestrator_and_the_gateway_are_published(compose: Services) -> None:
    published = {name: s["ports"] for name, s in compose.items() if s.get("ports")}
    assert sorted(published) == ["gateway", "orchestrator"]
    for name, host_port_expected in (("orchestrator", 50051), ("gateway", 8000)):
        (port,) = published[name]
        ns, settings = service_settings(name, compose[name])
        bind, host_side, container_side = str(port).split(":")
        assert int(container_side) == settings.server.port
        assert bind == "127.0.0.1", "the unauthenticated API is published on loopback unless DSI_BIND opens it"
        assert int(host_side) == host_port_expected
    _, gateway = service_settings("gateway", compose["gateway"])
    assert gateway.orchestrator == "orchestrator:50051"
    assert "orchestrator" in compose["gateway"]["depends_on"]


def test_orchestrator_finds_every_target_through_their_shared_alias(compose: Services) -> None:
    _, orch = service_settings("orchestrator", compose["orchestrator"])
    (spec,) = orch.targets
    assert spec.startswith("dns:///"), "targets must be discovered by name so that --scale works"
    alias, port = host_port(spec.removeprefix("dns:///"))
    targets = {n: s for n, s in compose.items() if compose_role(s) == "target"}
    for name, service in targets.items():
        assert alias in service["networks"]["default"]["aliases"], f"{name} lacks the alias {alias}"
        assert service_settings(name, service)[1].server.port == port
        assert "container_name" not in service, f"{name} could not be scaled"
    for name, service in compose.items():
        if name not in targets:
            aliases = ((service.get("networks") or {}).get("default") or {}).get("aliases") or []
            assert alias not in aliases, f"{name} would be taken for a target"
    drafter_host, drafter_port = host_port(orch.drafter)
    assert compose_role(compose[drafter_host]) == "drafter"
    assert service_settings(drafter_host, compose[drafter_host])[1].server.port == drafter_port
    for name, service in compose.items():
        if compose_role(service) in MODEL_ROLES:
            assert compose["orchestrator"]["depends_on"][name]["condition"] == "service_healthy"


def test_models_come_from_the_read_only_volume_or_the_built_in_pair(compose: Services) -> None:
    for name, service in compose.items():
        volumes = [str(v) for v in service.get("volumes", [])]
        assert any(v.endswith(":/models:ro") for v in volumes), f"{name} must see /models (read-only)"
        env = compose_env(service)
        role = compose_role(service)
        if role in MODEL_ROLES:
            assert env[f"DSI_{role.upper()}_MODEL"] == "", f"{name}: the built-in pair is the default"


def test_each_gpu_service_reserves_its_own_device() -> None:
    services = load_compose(COMPOSE)
    ids: dict[str, list[str]] = {}
    for name, service in services.items():
        devices = reserved_devices(service)
        if compose_role(service) not in MODEL_ROLES:
            assert not devices, f"{name} needs no GPU"
            continue
        assert devices, f"{name} reserves no GPU"
        (device,) = devices
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], device
        assert "count" not in device, f"{name}: count picks the same first GPUs for everyone; use device_ids"
        ids[name] = [str(i) for i in device["device_ids"]]
        assert len(ids[name]) == 1, f"{name} should own exactly one GPU"
        # The container sees only its own GPU, as cuda:0.
        role = compose_role(service)
        assert compose_env(service)[f"DSI_{role.upper()}_DEVICE"] == "cuda:0"
    flat = [i for v in ids.values() for i in v]
    assert len(ids) == 3 and len(set(flat)) == len(flat), f"GPUs are shared: {ids}"
    # Each id is its own variable, so another machine's GPUs are picked without editing the file.
    gpus = {"DSI_TARGET_0_GPU": "5", "DSI_TARGET_1_GPU": "6", "DSI_DRAFTER_GPU": "7"}
    custom = load_compose(COMPOSE, env=gpus)
    picked = sorted(str(reserved_devices(s)[0]["device_ids"][0])
                    for s in custom.values() if compose_role(s) in MODEL_ROLES)
    assert picked == ["5", "6", "7"]


def test_cpu_override_drops_the_gpus_and_runs_on_cpu() -> None:
    gpu, cpu = load_compose(COMPOSE), load_compose(COMPOSE, COMPOSE_CPU)
    assert set(cpu) == set(gpu), "the override must not add or lose services"
    for name, service in cpu.items():
        assert not reserved_devices(service), f"{name} still reserves a GPU"
        assert service["build"]["args"]["TORCH_VARIANT"] == "cpu"
        assert service["image"] != gpu[name]["image"], "the CPU build must not overwrite the GPU image's tag"
        ns, settings = service_settings(name, service)
        if compose_role(service) in MODEL_ROLES:
            assert settings.device == "cpu"
            assert settings.threads >= 1, "bound torch's threads: several services share the cores"
    for name, service in gpu.items():
        assert service["build"]["args"]["TORCH_VARIANT"] != "cpu", f"{name}: the GPU file builds a CUDA torch"


# --- Dockerfile and .dockerignore -------------------------------------------------------------------


def test_dockerfile_is_multi_stage_non_root_and_health_checked() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "build in one stage, run in a slim one"
    runtime = stages[-1]
    keywords = [k for k, _ in runtime]
    from_line = runtime[0][1]
    assert "slim" in from_line, f"runtime base should be slim: {from_line}"
    copies = [rest for k, rest in runtime if k == "COPY"]
    assert copies and all("--from=" in c for c in copies), "the runtime stage takes only the builder's output"
    runs = " ".join(rest for k, rest in runtime if k == "RUN")
    for tool in ("gcc", "build-essential", "pip install", "apt-get install"):
        assert tool not in runs, f"no {tool} at run time"
    (user,) = [rest for k, rest in runtime if k == "USER"]
    assert user.split(":")[0] not in ("root", "0"), user
    (healthcheck,) = [rest for k, rest in runtime if k == "HEALTHCHECK"]
    assert "CMD" in healthcheck and "dsi health" in healthcheck, healthcheck
    for var in re.findall(r"\$\{?([A-Z_]+)", healthcheck):
        assert var in image_env(), f"HEALTHCHECK uses {var}, which the image does not set"
    assert keywords.index("USER") < keywords.index("HEALTHCHECK")
    (entrypoint,) = [rest for k, rest in runtime if k == "ENTRYPOINT"]
    assert entrypoint == '["dsi"]'
    env = image_env()
    for role in ("TARGET", "DRAFTER", "ORCHESTRATOR"):
        assert env[f"DSI_{role}_HOST"] == "0.0.0.0"
    ports = sorted(int(env[f"DSI_{r}_PORT"]) for r in ("TARGET", "DRAFTER", "ORCHESTRATOR"))
    (expose,) = [rest for k, rest in runtime if k == "EXPOSE"]
    assert sorted(int(p) for p in expose.split()) == ports


def test_dockerfile_pins_torch_from_constraints_and_offers_a_cuda_variant() -> None:
    text = DOCKERFILE.read_text()
    pins = re.findall(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert len(pins) == 1, "the Dockerfile reads torch's version from a 'torch==X' line of constraints.txt"
    assert "COPY constraints.txt" in text and 'torch==${torch_version}' in text
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", text, re.M)
    assert "https://download.pytorch.org/whl/${TORCH_VARIANT}" in text
    assert "cuda)" in text, "TORCH_VARIANT=cuda installs PyPI's CUDA build"


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.lstrip("!").strip("/")
        candidates = [pattern, pattern.removeprefix("**/")] if pattern.startswith("**/") else [pattern]
        for p in prefixes:
            names = [p] + (["/".join(p.split("/")[i:]) for i in range(len(p.split("/")))]
                           if pattern.startswith("**/") else [])
            if any(fnmatch.fnmatchcase(n, c) for n in names for c in candidates):
                excluded = not negate
                break
    return excluded


def test_dockerignore_sends_only_the_sources() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    for path in (".venv/bin/python", ".git/HEAD", "tests/unit/test_x.py", "bench-results/a.json",
                 "models/target/model.safetensors", ".pytest_cache/v", "dsi/__pycache__/cli.cpython-311.pyc",
                 "services/target/__pycache__/x.pyc", "dsi.egg-info/PKG-INFO"):
        assert dockerignored(path, patterns), f"{path} would be sent to the build"
    sources = []
    for stage in dockerfile_stages():
        for keyword, rest in stage:
            if keyword == "COPY" and "--from=" not in rest:
                sources += [s for s in rest.split()[:-1] if not s.startswith("--")]
    assert sources, "the builder copies the project's files"
    for src in sources + ["dsi/cli.py", "services/target/server.py", "dsi/v1/target_pb2.py"]:
        assert not dockerignored(src, patterns), f"{src} is needed by the build but ignored"
        assert (ROOT / src).exists() or src == "README.md", f"{src} is copied but does not exist"


# --- Kubernetes -------------------------------------------------------------------------------------


def k8s_objects() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for f in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in k8s_objects() if o["kind"] == kind}


def k8s_container(deployment: Mapping[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def k8s_settings(name: str, deployment: Mapping[str, Any]) -> tuple[argparse.Namespace, Any]:
    container = k8s_container(deployment)
    env = localize({**image_env(), **{e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}})
    args = list(container.get("command", [])[1:]) + list(container["args"])
    ns = parse_cli(args, env, f"Deployment {name}")
    return ns, validate_settings(ns, f"Deployment {name}")


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {f.name for f in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_every_k8s_container_is_accepted_probed_over_grpc_and_not_root() -> None:
    deployments = by_kind("Deployment")
    roles = sorted(k8s_settings(n, d)[0].role for n, d in deployments.items())
    assert roles == ["drafter", "gateway", "orchestrator", "target"]
    for name, deployment in deployments.items():
        container = k8s_container(deployment)
        ns, settings = k8s_settings(name, deployment)
        assert settings.server.host == "0.0.0.0"
        (port,) = container["ports"]
        assert port["containerPort"] == settings.server.port
        if ns.role == "gateway":  # HTTP: ready while the orchestrator is SERVING, alive while it answers
            assert port["name"] == "http"
            assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
            assert container["livenessProbe"]["httpGet"]["port"] == "http"
            assert settings.orchestrator == "dsi-orchestrator:50051"
        else:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert container[probe]["grpc"]["port"] == settings.server.port, f"{name} {probe}"
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
        if ns.role in MODEL_ROLES:
            assert gpus == 1, f"{name} owns one GPU per replica"
            assert settings.device == "cuda:0"
        else:
            assert gpus is None, f"{name} needs no GPU"
    assert deployments["dsi-target"]["spec"]["replicas"] >= 2


def test_targets_sit_behind_a_headless_service_the_orchestrator_resolves() -> None:
    services, deployments = by_kind("Service"), by_kind("Deployment")
    for name, service in services.items():
        selector = service["spec"]["selector"].items()
        pods = [d["spec"]["template"]["metadata"]["labels"].items() for d in deployments.values()]
        assert any(selector <= labels for labels in pods), f"Service {name} selects no Deployment's pods"
    target = services["dsi-target"]
    assert target["spec"]["clusterIP"] == "None", "one DNS record per target pod needs a headless Service"
    _, orch = k8s_settings("dsi-orchestrator", deployments["dsi-orchestrator"])
    (spec,) = orch.targets
    host, port = host_port(spec.removeprefix("dns:///"))
    assert spec.startswith("dns:///") and host.split(".")[0] == "dsi-target"
    target_port = k8s_settings("dsi-target", deployments["dsi-target"])[1].server.port
    assert port == target["spec"]["ports"][0]["port"] == target_port
    drafter_host, drafter_port = host_port(orch.drafter)
    assert drafter_port == services[drafter_host]["spec"]["ports"][0]["port"]
    assert services["dsi-orchestrator"]["spec"]["ports"][0]["port"] == orch.server.port


# --- security: compose's secure override, the Kubernetes overlay, NetworkPolicies -------------------

# The files each role needs, and no more (a CA's key never).
ROLE_SECRETS = {
    "target": {"internal-ca.crt", "target.crt", "target.key"},
    "drafter": {"internal-ca.crt", "drafter.crt", "drafter.key"},
    "orchestrator": {"ca.crt", "internal-ca.crt", "orchestrator.crt", "orchestrator.key", "orchestrator-client.crt",
                     "orchestrator-client.key", "api-keys"},
    "gateway": {"ca.crt", "client.crt", "client.key", "api-keys"},
}


@pytest.mark.parametrize("files", [(COMPOSE, COMPOSE_SECURE), (COMPOSE, COMPOSE_CPU, COMPOSE_SECURE)],
                         ids=["gpu-secure", "cpu-secure"])
def test_the_secure_compose_override_wires_tls_and_keys(files: tuple[Path, ...]) -> None:
    services = load_compose(*files)
    doc = yaml.load(COMPOSE_SECURE.read_text(), Loader=ComposeLoader)
    defined = interpolate(doc["secrets"], {"DSI_TLS_DIR": "/certs", "DSI_API_KEY_FILE": "/keys/api-keys"})
    for name, secret in defined.items():
        assert name in SECRET_FILES and secret["file"].rsplit("/", 1)[1] == name, (name, secret)
    envs: dict[str, dict[str, str]] = {}
    for name, service in services.items():
        role = compose_role(service)
        env = compose_env(service)
        used = {n for n in (secret_name(v) for v in env.values()) if n}
        mounted = set(service.get("secrets") or [])
        assert used <= mounted, f"{name} reads {used - mounted}, which it does not mount"
        assert mounted == ROLE_SECRETS[role], f"{name} mounts {mounted}, needs {ROLE_SECRETS[role]}"
        envs[role] = env
        _, settings = service_settings(name, service)
        if role in MODEL_ROLES:
            assert settings.server.tls is not None and settings.server.tls.mutual, name
        elif role == "orchestrator":
            assert settings.server.tls is not None and settings.upstream_tls is not None
            assert settings.upstream_tls.cert and settings.api_key_file and not settings.expose_internals
            assert not settings.server.reflection
        else:
            assert settings.orchestrator_ca and settings.orchestrator_api_key and settings.api_key_file
        # The base file's health check (`dsi health 127.0.0.1:PORT`) now speaks TLS through DSI_CA etc.
        check = service["healthcheck"]["test"]
        if check[1:3] == ["dsi", "health"]:
            health = parse_cli(check[2:], localize(env), f"{name} healthcheck")
            assert health.ca, f"{name}: its health check would speak plaintext to a TLS port"
    check_tls_wiring(envs, "compose")
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    assert all(str(p).startswith("127.0.0.1:") for ports in published.values() for p in ports)


def test_the_gateway_loads_the_targets_tokenizer_in_compose() -> None:
    """The orchestrator does not tell its checkpoint's path (internals hidden), so compose hands the
    gateway the target model (nested interpolation), unless DSI_TOKENIZER says otherwise."""
    cases = [({}, ""), ({"DSI_TARGET_MODEL": "/models/t"}, "/models/t"),
             ({"DSI_TARGET_MODEL": "/models/t", "DSI_TOKENIZER": "/models/tok"}, "/models/tok")]
    for env, expected in cases:
        services = load_compose(COMPOSE, env=env)
        assert compose_env(services["gateway"])["DSI_GATEWAY_TOKENIZER"] == expected, env
        _, orch = service_settings("orchestrator", services["orchestrator"])
        assert not orch.expose_internals
    _, orch = service_settings("orchestrator", load_compose(COMPOSE, env={"DSI_EXPOSE_INTERNALS": "1"})["orchestrator"])
    assert orch.expose_internals and orch.server.reflection


def _selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        assert expr["operator"] in ("In", "NotIn", "Exists"), expr
        value = labels.get(expr["key"])
        if expr["operator"] == "In" and value not in expr["values"]:
            return False
        if expr["operator"] == "NotIn" and value in expr["values"]:
            return False
        if expr["operator"] == "Exists" and value is None:
            return False
    return True


def test_network_policies_let_only_the_orchestrator_reach_the_model_services() -> None:
    deployments = by_kind("Deployment")
    pods = {k8s_settings(n, d)[0].role: d["spec"]["template"]["metadata"]["labels"] for n, d in deployments.items()}
    policies = list(by_kind("NetworkPolicy").values())
    client_pod = {"app": "my-client", "dsi-client": "true"}
    stranger = {"app": "something-else"}

    def may_connect(source: Mapping[str, str], role: str) -> bool:
        applying = [p for p in policies if _selects(p["spec"]["podSelector"], pods[role])]
        assert applying, f"no NetworkPolicy applies to the {role} pods: anyone may connect"
        for policy in applying:
            assert policy["spec"]["policyTypes"] == ["Ingress"]
            for rule in policy["spec"]["ingress"]:
                ports = {p["port"] for p in rule["ports"]}
                container = next(k8s_container(d) for d in deployments.values()
                                 if d["spec"]["template"]["metadata"]["labels"] == pods[role])
                assert ports == {container["ports"][0]["name"]}, f"{role}: only its service port"
                sources = rule.get("from")
                if sources is None or any(_selects(s["podSelector"], source) for s in sources):
                    return True
        return False

    for role in MODEL_ROLES:
        assert may_connect(pods["orchestrator"], role)
        for other in (pods["gateway"], client_pod, stranger, pods["target"]):
            assert not may_connect(other, role), f"{other} reaches the {role}"
    assert may_connect(pods["gateway"], "orchestrator") and may_connect(client_pod, "orchestrator")
    assert not may_connect(stranger, "orchestrator") and not may_connect(pods["target"], "orchestrator")
    assert may_connect(stranger, "gateway")  # the HTTP front door; its API key guards it


_MERGE_KEYS = {"containers": "name", "env": "name", "volumes": "name", "volumeMounts": "mountPath"}


def strategic_merge(base: Any, patch: Any, key: str = "") -> Any:
    """Kubernetes' strategic merge patch, enough for the overlay: mappings merge (null deletes a key),
    lists of containers, env, volumes and mounts merge by their key, other values are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, value in patch.items():
            if value is None:
                out.pop(k, None)
            else:
                out[k] = strategic_merge(base.get(k), value, k)
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in _MERGE_KEYS:
        merge_key = _MERGE_KEYS[key]
        merged = {item[merge_key]: item for item in base}
        for item in patch:
            merged[item[merge_key]] = strategic_merge(merged.get(item[merge_key]), item)
        return list(merged.values())
    return patch


def test_the_secure_kubernetes_overlay_wires_tls_keys_and_probes() -> None:
    kustomization = yaml.safe_load((K8S_SECURE / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../"]
    patches = {p["path"] for p in kustomization["patches"]}
    assert patches == {f.name for f in K8S_SECURE.glob("*.yaml")} - {"kustomization.yaml"}
    generated: dict[str, set[str]] = {}
    for generator in kustomization["secretGenerator"]:
        files = {f.rsplit("/", 1)[1] for f in generator["files"]}
        assert files <= set(SECRET_FILES) and not any(f.endswith("ca.key") for f in files), generator
        assert all(f == f"certs/{f.rsplit('/', 1)[1]}" for f in generator["files"])  # make-certs.sh's directory
        generated[generator["name"]] = files
    deployments = by_kind("Deployment")
    envs: dict[str, dict[str, str]] = {}
    for path in sorted(patches):
        patch = yaml.safe_load((K8S_SECURE / path).read_text())
        name = patch["metadata"]["name"]
        assert patch["kind"] == "Deployment" and name in deployments, path
        base_names = [c["name"] for c in deployments[name]["spec"]["template"]["spec"]["containers"]]
        assert [c["name"] for c in patch["spec"]["template"]["spec"]["containers"]] == base_names, path
        deployment = strategic_merge(deployments[name], patch)
        pod = deployment["spec"]["template"]["spec"]
        container = k8s_container(deployment)
        env = {e["name"]: str(e["value"]) for e in container["env"] if "value" in e}
        volumes = {v["name"]: v["secret"]["secretName"] for v in pod.get("volumes", [])}
        mounts = {m["mountPath"].rstrip("/"): m["name"] for m in container.get("volumeMounts", [])}
        for value in env.values():
            secret = secret_name(value)
            if secret:
                mount = mounts[value.rsplit("/", 1)[0]]
                assert secret in generated[volumes[mount]], f"{name}: {value} is not in Secret {volumes[mount]}"
        ns, settings = k8s_settings(name, deployment)
        role = ns.role
        envs[role] = env
        assert {f for s in volumes.values() for f in generated[s]} == ROLE_SECRETS[role], name
        assert pod["securityContext"]["fsGroup"] == 10001 and all(
            v["secret"]["defaultMode"] == 0o440 for v in pod["volumes"]), f"{name}: readable by the pod's group only"
        if role == "gateway":
            assert settings.orchestrator_ca and settings.orchestrator_api_key and settings.api_key_file
            continue
        assert settings.server.tls is not None
        if role in MODEL_ROLES:
            assert settings.server.tls.mutual
        else:
            assert settings.upstream_tls is not None and settings.api_key_file and not settings.server.reflection
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            spec = container[probe]
            assert "grpc" not in spec, f"{name} {probe}: the kubelet's gRPC probe cannot speak TLS"
            command = spec["exec"]["command"]
            assert command[:2] == ["dsi", "health"], command
            health = parse_cli(command[1:], localize(env), f"{name} {probe}")
            assert host_port(health.address) == ("127.0.0.1", settings.server.port)
            assert health.ca and spec["timeoutSeconds"] > health.timeout_s, f"{name} {probe}"
    check_tls_wiring(envs, "kubernetes")

