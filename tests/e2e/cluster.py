"""The compose cluster under test: its `docker compose` command line, its containers (through the
Docker SDK that testcontainers brings), the orchestrator's published address, and polling helpers
(every wait here polls with a deadline; none sleeps a fixed time for readiness)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.cpu.yml"]
ORCHESTRATOR_PORT = 50051
T = TypeVar("T")


def results_dir() -> Path:
    """Where the e2e tier leaves what a person reads afterwards (`docker compose ps`, timings, logs)."""
    out = Path(os.environ.get("DSI_E2E_OUT", ROOT / "build" / "e2e"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def record_timing(phase: str, seconds: float) -> None:
    with open(results_dir() / "timings.txt", "a") as f:
        f.write(f"{phase}\t{seconds:.1f}\n")


def compose_cli_unavailable() -> str | None:
    """Why `docker compose` (v2) cannot be run here, or None."""
    if shutil.which("docker") is None:
        return "no `docker` command on PATH"
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"`docker compose` (v2) is not available: {(probe.stderr or probe.stdout).strip()}"
    return None


def docker_unavailable() -> str | None:
    """Why the cluster cannot run here, or None."""
    if os.environ.get("DSI_E2E_UNAVAILABLE"):
        return os.environ["DSI_E2E_UNAVAILABLE"]  # scripts/e2e.sh found no engine it may start
    if shutil.which("docker") is None:
        return "no `docker` command on PATH"
    try:
        import docker

        docker.from_env().ping()
    except Exception as exc:  # noqa: BLE001 - any failure means: no engine to talk to
        return f"no Docker engine answers ({type(exc).__name__}: {exc})"
    return compose_cli_unavailable()


def poll(what: str, probe: Callable[[], T | None], timeout_s: float, interval_s: float = 0.25) -> T:
    """The first truthy value of ``probe()``, polling until ``timeout_s``; else fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            last = probe()
        except Exception as exc:  # noqa: BLE001 - a transient error is one more failed poll
            last = exc
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")
        time.sleep(interval_s)


@dataclass
class ComposeCluster:
    """One compose project (``project``) started from this checkout's compose files."""

    project: str
    env: dict[str, str]
    address: str = ""
    _client: Any = field(default=None, repr=False)

    # -- docker compose ----------------------------------------------------------------------------

    @property
    def command(self) -> list[str]:
        args = [a for f in COMPOSE_FILES for a in ("-f", f)]
        return ["docker", "compose", "-p", self.project, *args]

    def compose(self, *args: str, timeout_s: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*self.command, *args], cwd=ROOT, env={**os.environ, **self.env},
                              capture_output=True, text=True, timeout=timeout_s)
        if check and done.returncode != 0:
            raise AssertionError(f"`docker compose {' '.join(args)}` exited {done.returncode}:\n"
                                 f"{done.stderr[-4000:]}\n{done.stdout[-2000:]}")
        return done

    def logs(self, tail: int = 400) -> str:
        try:
            done = self.compose("logs", "--no-color", "--timestamps", "--tail", str(tail), timeout_s=60, check=False)
            return done.stdout + done.stderr
        except Exception as exc:  # noqa: BLE001 - best effort, for a failure report only
            return f"(no logs: {exc})"

    # -- containers --------------------------------------------------------------------------------

    @property
    def docker(self) -> Any:
        if self._client is None:
            import docker

            self._client = docker.from_env(timeout=120)
        return self._client

    def containers(self, service: str | None = None, include_stopped: bool = False) -> list[Any]:
        labels = [f"com.docker.compose.project={self.project}"]
        if service:
            labels.append(f"com.docker.compose.service={service}")
        found = self.docker.containers.list(all=include_stopped, filters={"label": labels})
        return sorted(found, key=lambda c: (c.labels.get("com.docker.compose.service", ""),
                                            int(c.labels.get("com.docker.compose.container-number", "0"))))

    def container(self, service: str, number: int = 1) -> Any:
        for c in self.containers(service, include_stopped=True):
            if c.labels.get("com.docker.compose.container-number") == str(number):
                return c
        raise AssertionError(f"no container {service} #{number} in project {self.project}")

    @property
    def network(self) -> str:
        return f"{self.project}_default"

    def ip(self, container: Any) -> str:
        container.reload()
        return str(container.attrs["NetworkSettings"]["Networks"][self.network]["IPAddress"])

    def target_address(self, container: Any) -> str:
        return f"{self.ip(container)}:50061"

    def container_of(self, address: str) -> Any:
        for c in self.containers():
            if self.network in c.attrs["NetworkSettings"]["Networks"] and self.target_address(c) == address:
                return c
        raise AssertionError(f"no running container of project {self.project} has address {address}")

    def health(self, container: Any) -> str:
        container.reload()
        return str(container.attrs["State"].get("Health", {}).get("Status", "none"))

    # -- the orchestrator, through the SDK ---------------------------------------------------------

    def info(self) -> dict[str, Any]:
        from dsi.client import Client

        with Client(self.address, timeout=10) as client:
            return client.info()

    def targets(self) -> list[dict[str, Any]]:
        return list(self.info().get("targets", []))

    def healthy_targets(self) -> list[str]:
        return sorted(t["address"] for t in self.targets() if t.get("healthy"))

    def wait_for_healthy_targets(self, count: int, timeout_s: float, including: Iterable[str] = ()) -> list[str]:
        wanted = set(including)

        def probe() -> list[str] | None:
            found = self.healthy_targets()
            return found if len(found) == count and wanted <= set(found) else None

        return poll(f"{count} healthy targets in Info (including {sorted(wanted)})", probe, timeout_s)

    def wait_for_container_health(self, container: Any, timeout_s: float) -> None:
        poll(f"{container.name} to be healthy", lambda: self.health(container) == "healthy", timeout_s, 0.5)
