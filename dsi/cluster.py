"""A local cluster as separate processes: N targets, one drafter, the orchestrator (``dsi up``)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    """A process of the cluster failed to start; the message includes the end of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_health(address: str, service: str = "", timeout_s: float = 2.0) -> bool:
    """True when the server at address reports SERVING for service ('' = the whole server)."""
    with grpc.insecure_channel(address) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING


@dataclass
class ServiceProcess:
    name: str
    address: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class ClusterSpec:
    target_model: str = ""  # "" = the built-in default pair
    drafter_model: str = ""
    targets: int = 2
    host: str = "127.0.0.1"
    port: int = 50051  # orchestrator; 0 = a free port
    threads: int = 1  # torch threads per model service
    device: str = "auto"
    dtype: str = "auto"
    emulate_target_ms: str = ""  # PREFILL:DECODE
    emulate_drafter_ms: str = ""
    oracle_acceptance: float = 0.0
    lookahead: int = 5
    log_dir: str = ""  # "" = a temporary directory, removed after a clean stop unless keep_logs
    keep_logs: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)
    startup_timeout_s: float = 300.0


class LocalCluster:
    """Start with ``start()`` (or as a context manager), stop with ``stop()``; every process it
    started is stopped, also when start-up fails."""

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.processes: list[ServiceProcess] = []
        self.address = ""
        self._own_log_dir = not spec.log_dir
        self.log_dir = Path(spec.log_dir or tempfile.mkdtemp(prefix="dsi-cluster-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._failed = False

    def _spawn(self, name: str, args: list[str], port: int) -> ServiceProcess:
        log_path = self.log_dir / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.spec.extra_env}
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "dsi.cli", "serve", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # Ctrl-C in a terminal reaches us; we stop the children
            )
        sp = ServiceProcess(name, f"{self.spec.host}:{port}", proc, log_path)
        self.processes.append(sp)
        return sp

    def _wait(self, sp: ServiceProcess, service: str, deadline: float) -> None:
        while time.monotonic() < deadline:
            if sp.process.poll() is not None:
                raise ClusterError(
                    f"{sp.name} exited with code {sp.process.returncode} during start-up; log {sp.log_path}:\n"
                    f"{sp.log_tail()}"
                )
            if check_health(sp.address, service, timeout_s=1.0):
                return
            time.sleep(0.2)
        raise ClusterError(f"{sp.name} did not become healthy in time; log {sp.log_path}:\n{sp.log_tail()}")

    def start(self) -> str:
        spec = self.spec
        try:
            if not spec.target_model or (not spec.drafter_model and spec.oracle_acceptance <= 0):
                from dsi.default_pair import ensure_default_pair

                pair = ensure_default_pair()  # build the fallback pair once, before the services race for it
                target_model = spec.target_model or str(pair.target)
                drafter_model = spec.drafter_model or str(pair.drafter)
            else:
                target_model, drafter_model = spec.target_model, spec.drafter_model
            if spec.oracle_acceptance > 0:
                drafter_model = target_model
            common = ["--host", spec.host, "--threads", str(spec.threads), "--device", spec.device,
                      "--dtype", spec.dtype]
            targets = []
            for i in range(spec.targets):
                port = free_port(spec.host)
                args = ["target", "--model", target_model, "--port", str(port), *common]
                if spec.emulate_target_ms:
                    args += ["--emulate-latency-ms", spec.emulate_target_ms]
                targets.append(self._spawn(f"target-{i}", args, port))
            port = free_port(spec.host)
            args = ["drafter", "--model", drafter_model, "--port", str(port), *common]
            if spec.emulate_drafter_ms:
                args += ["--emulate-latency-ms", spec.emulate_drafter_ms]
            if spec.oracle_acceptance > 0:
                args += ["--oracle-acceptance", str(spec.oracle_acceptance)]
            drafter = self._spawn("drafter", args, port)
            deadline = time.monotonic() + spec.startup_timeout_s
            for sp in [*targets, drafter]:
                self._wait(sp, "", deadline)
            port = spec.port or free_port(spec.host)
            orch = self._spawn(
                "orchestrator",
                ["orchestrator", "--host", spec.host, "--port", str(port),
                 "--targets", ",".join(t.address for t in targets), "--drafter", drafter.address,
                 "--lookahead", str(spec.lookahead), "--startup-timeout-s", str(int(spec.startup_timeout_s))],
                port,
            )
            self._wait(orch, "", deadline)
            self.address = orch.address
            return self.address
        except BaseException:
            self._failed = True  # keep the logs: the error message points at them
            self.stop()
            raise

    @property
    def targets(self) -> list[ServiceProcess]:
        return [p for p in self.processes if p.name.startswith("target")]

    def service(self, name: str) -> ServiceProcess:
        return next(p for p in self.processes if p.name == name)

    def stop(self, grace_s: float = 10.0) -> None:
        for sp in reversed(self.processes):
            if sp.process.poll() is None:
                sp.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for sp in self.processes:
            try:
                sp.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                sp.process.kill()
                sp.process.wait()
        self.processes.clear()
        if self._own_log_dir and not self._failed and not self.spec.keep_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
