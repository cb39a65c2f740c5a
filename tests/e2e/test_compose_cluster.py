"""The docker-compose cluster (CPU override) built from this checkout: two targets found through
their shared DNS alias, the drafter and the orchestrator, checked through the SDK: DSI output equals
non-SI output token for token, and a scaled-up target is picked up without a restart.

Skipped, with the reason, where no Docker engine (or no compose v2 plugin) answers."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.cpu.yml"]
PROMPTS = ["The quick brown fox", "Distributed speculative inference"]


def docker_unavailable() -> str | None:
    """Why the cluster cannot run here, or None."""
    if shutil.which("docker") is None:
        return "no `docker` command on PATH"
    try:
        import docker

        docker.from_env().ping()
    except Exception as exc:  # noqa: BLE001 - any failure means: no engine to talk to
        return f"no Docker engine answers ({type(exc).__name__}: {exc})"
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"`docker compose` (v2) is not available: {probe.stderr.strip()}"
    return None


def compose_cli_unavailable() -> str | None:
    if shutil.which("docker") is None:
        return "no `docker` command on PATH"
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"`docker compose` (v2) is not available: {(probe.stderr or probe.stdout).strip()}"
    return None


def healthy_targets(address: str) -> list[str]:
    from dsi.client import Client

    with Client(address, timeout=10) as client:
        return sorted(t["address"] for t in client.info().get("targets", []) if t.get("healthy"))


def wait_for_targets(address: str, count: int, timeout_s: float) -> list[str]:
    deadline = time.monotonic() + timeout_s
    found: list[str] = []
    while time.monotonic() < deadline:
        found = healthy_targets(address)
        if len(found) >= count:
            return found
        time.sleep(1.0)
    raise AssertionError(f"expected {count} healthy targets within {timeout_s}s, got {found}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, str]]:
    reason = docker_unavailable()
    if reason:
        pytest.skip(f"e2e compose cluster needs Docker: {reason}")
    from testcontainers.compose import DockerCompose

    env = {
        "COMPOSE_PROJECT_NAME": f"dsi-e2e-{os.getpid()}",  # never touch a user's own `dsi` project
        "DSI_PORT": "0",  # Docker picks a free host port, read back below: no port picked here and raced for
        "DSI_MODELS_DIR": str(tmp_path_factory.mktemp("models")),  # the built-in pair; keep ./ clean
        "DSI_THREADS": "1",
        "DSI_RESOLVE_INTERVAL_S": "1",
    }
    with mock.patch.dict(os.environ, env):
        compose = DockerCompose(ROOT, compose_file_name=COMPOSE_FILES, build=True, wait=True)
        try:
            compose.start()
        except subprocess.CalledProcessError as exc:
            out, err = _logs(compose)
            compose.stop()
            pytest.fail(f"`docker compose up` failed: {exc.stderr.decode(errors='replace')[-3000:]}\n"
                        f"service logs:\n{out[-6000:]}\n{err[-3000:]}")
        try:
            port = compose.get_service_port("orchestrator", 50051)
            if not port:
                pytest.fail("docker compose published no host port for the orchestrator's 50051")
            yield compose, f"127.0.0.1:{port}"
        finally:
            compose.stop()


def _logs(compose: object) -> tuple[str, str]:
    try:
        return compose.get_logs()  # type: ignore[attr-defined, no-any-return]
    except Exception as exc:  # noqa: BLE001 - best effort, for the failure message only
        return "", f"(no logs: {exc})"


@pytest.mark.parametrize("files", [COMPOSE_FILES[:1], COMPOSE_FILES], ids=["gpu", "cpu"])
def test_compose_itself_accepts_the_files(files: list[str]) -> None:
    """Compose's own validation (no engine needed): schema, !reset, interpolation."""
    reason = compose_cli_unavailable()
    if reason:
        pytest.skip(reason)
    args = [a for f in files for a in ("-f", f)]
    done = subprocess.run(["docker", "compose", *args, "config", "--quiet"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_both_targets_are_discovered_through_the_alias(cluster: tuple[object, str]) -> None:
    _, address = cluster
    assert len(wait_for_targets(address, 2, timeout_s=60)) == 2


@pytest.mark.parametrize("prompt", PROMPTS)
def test_dsi_output_equals_non_si_token_for_token(cluster: tuple[object, str], prompt: str) -> None:
    from dsi.client import Client

    _, address = cluster
    with Client(address, timeout=120) as client:
        reference = client.generate(prompt, max_new_tokens=16, mode="nonsi", ignore_eos=True)
        assert len(reference.token_ids) == 16
        for mode in ("dsi", "si"):
            got = client.generate(prompt, max_new_tokens=16, mode=mode, ignore_eos=True)
            assert got.token_ids == reference.token_ids, f"{mode} differs from non-SI for {prompt!r}"
            assert got.text == reference.text
            assert got.stats["mode"] == mode


def test_scaling_a_target_service_adds_a_verifier_without_restarting(cluster: tuple[object, str]) -> None:
    from dsi.client import Client

    compose, address = cluster
    base = list(compose.compose_command_property)  # type: ignore[attr-defined]
    subprocess.run([*base, "up", "--detach", "--wait", "--no-recreate", "--scale", "target-1=2"],
                   cwd=ROOT, check=True, capture_output=True, timeout=900)
    try:
        assert len(wait_for_targets(address, 3, timeout_s=120)) == 3
        with Client(address, timeout=120) as client:
            reference = client.generate(PROMPTS[0], max_new_tokens=16, mode="nonsi", ignore_eos=True)
            got = client.generate(PROMPTS[0], max_new_tokens=16, mode="dsi", ignore_eos=True)
        assert got.token_ids == reference.token_ids
    finally:
        subprocess.run([*base, "up", "--detach", "--wait", "--no-recreate", "--scale", "target-1=1"],
                       cwd=ROOT, check=False, capture_output=True, timeout=900)
