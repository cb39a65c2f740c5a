"""A local cluster as separate processes: N targets, one drafter, the orchestrator (``dsi up``), and
the one way services are started as processes (here, by the tests and by the benchmarks): with
``--port 0``, the bound port read back from the 'listening on' line the service prints, so no port
is picked, released and raced for. With a certificate directory (scripts/make-certs.sh) every
process gets its TLS flags, and with a key file the public APIs require a key."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dsi.tls import ClientTLS, sync_channel

log = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    """A process of the cluster failed to start; the message includes the end of its log."""


def check_health(address: str, service: str = "", timeout_s: float = 2.0, tls: ClientTLS | None = None) -> bool:
    """True when the server at address reports SERVING for service ('' = the whole server); over TLS
    with ``tls``."""
    with sync_channel(address, tls) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING


# The line a server prints on stdout once it is SERVING (services/runtime/serving.py).
_LISTENING = re.compile(r"^dsi-[\w-]+ listening on (?P<bind>\S+)$")


def serve_command(role: str, args: list[str], host: str = "127.0.0.1", port: int = 0) -> list[str]:
    """``dsi serve ROLE`` on host:port (0 = a port the server picks and reports) with ARGS."""
    return [sys.executable, "-m", "dsi.cli", "serve", role, "--host", host, "--port", str(port), *args]


@dataclass
class ServiceProcess:
    """A service started by ``launch``; ``address`` is known once ``wait_listening`` returned."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    host: str = "127.0.0.1"
    address: str = ""
    _log_offset: int = field(default=0, init=False, repr=False)  # log bytes read by wait_listening
    _partial: bytes = field(default=b"", init=False, repr=False)  # an unfinished line from that read

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _listening_port(self) -> int | None:
        """The port from a 'listening on' line written to the log since the last call, if any."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                data = f.read()
        except OSError:
            return None
        self._log_offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            match = _LISTENING.match(line.decode(errors="replace").strip())
            if match:
                return int(match["bind"].rsplit(":", 1)[1])
        return None

    def wait_listening(self, deadline: float) -> str:
        """Wait (until time.monotonic() reaches deadline) for the service's 'listening on HOST:PORT'
        line, which it prints once it is SERVING on the port it bound; returns and sets
        ``address``. Raises ClusterError, with the end of the log, when the process exits first or
        the deadline passes."""
        while True:
            port = self._listening_port()
            if port is not None:
                self.address = f"{self.host}:{port}"
                return self.address
            if self.process.poll() is not None:
                if self._listening_port() is None:  # the line may have landed just before the exit
                    raise ClusterError(
                        f"{self.name} exited with code {self.process.returncode} during start-up; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                continue
            if time.monotonic() >= deadline:
                raise ClusterError(
                    f"{self.name} did not report 'listening on' in time; log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.05)


def launch(
    name: str,
    command: list[str],
    log_path: Path,
    host: str = "127.0.0.1",
    env: dict[str, str] | None = None,
    new_session: bool = False,
) -> ServiceProcess:
    """Start ``command`` with stdout and stderr going to log_path; wait for it with
    ``ServiceProcess.wait_listening`` (servers get ``--port 0`` and report the port they bound, so
    no port is picked here and raced for)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            start_new_session=new_session,
        )
    return ServiceProcess(name, proc, log_path, host)


def launch_and_wait(
    name: str,
    command: list[str],
    log_path: Path,
    timeout_s: float,
    host: str = "127.0.0.1",
    env: dict[str, str] | None = None,
    new_session: bool = False,
) -> ServiceProcess:
    """``launch`` then ``wait_listening``; the process is killed when it does not come up."""
    sp = launch(name, command, log_path, host, env, new_session)
    try:
        sp.wait_listening(time.monotonic() + timeout_s)
    except BaseException:
        stop_process(sp.process)
        raise
    return sp


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after grace_s; returns once the process is gone."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# The files of a certificate directory (scripts/make-certs.sh) that each process uses.
CERT_FILES = (
    "ca.crt", "orchestrator.crt", "orchestrator.key", "client.crt", "client.key", "internal-ca.crt",
    "target.crt", "target.key", "drafter.crt", "drafter.key", "orchestrator-client.crt", "orchestrator-client.key",
)


@dataclass(frozen=True)
class ClusterTLS:
    """A certificate directory made by scripts/make-certs.sh, as each process's flags: TLS on every
    service, mutual TLS (the internal CA) between the orchestrator and the model services, and the
    public CA for the orchestrator's clients (the gateway)."""

    dir: Path

    def __post_init__(self) -> None:
        missing = [name for name in CERT_FILES if not (self.dir / name).is_file()]
        if missing:
            raise ClusterError(f"{self.dir} lacks {', '.join(missing)}: make it with scripts/make-certs.sh {self.dir}")

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def model_service(self, role: str) -> list[str]:
        return ["--tls-cert", self.path(f"{role}.crt"), "--tls-key", self.path(f"{role}.key"),
                "--tls-client-ca", self.path("internal-ca.crt")]

    def orchestrator(self) -> list[str]:
        return ["--tls-cert", self.path("orchestrator.crt"), "--tls-key", self.path("orchestrator.key"),
                "--upstream-tls-ca", self.path("internal-ca.crt"),
                "--upstream-tls-cert", self.path("orchestrator-client.crt"),
                "--upstream-tls-key", self.path("orchestrator-client.key")]

    def gateway(self) -> list[str]:
        return ["--orchestrator-ca", self.path("ca.crt"), "--orchestrator-cert", self.path("client.crt"),
                "--orchestrator-key", self.path("client.key")]


@dataclass
class ClusterSpec:
    target_model: str = ""  # "" = the built-in default pair
    drafter_model: str = ""
    targets: int = 2
    host: str = "127.0.0.1"
    port: int = 50051  # orchestrator; 0 = a free port it picks and reports (model services always do)
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
    http_port: int | None = None  # the OpenAI-compatible gateway's port (0 = any free); None = no gateway
    tls_dir: str = ""  # certificates from scripts/make-certs.sh: TLS everywhere, mutual TLS inside
    api_key_file: str = ""  # keys the orchestrator (and the gateway) require; "" = none
    # Info's addresses and paths, the targets' error messages and reflection for clients. None: exposed
    # (a development cluster on loopback, as the benchmarks read it) unless tls_dir or api_key_file
    # ask for a secured cluster.
    expose_internals: bool | None = None

    @property
    def secured(self) -> bool:
        return bool(self.tls_dir or self.api_key_file)

    @property
    def exposes_internals(self) -> bool:
        return not self.secured if self.expose_internals is None else self.expose_internals


class LocalCluster:
    """Start with ``start()`` (or as a context manager), stop with ``stop()``; every process it
    started is stopped, also when start-up fails."""

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.processes: list[ServiceProcess] = []
        self.address = ""
        self.http_address = ""  # HOST:PORT of the gateway, when spec.http_port is set
        self._own_log_dir = not spec.log_dir
        self.log_dir = Path(spec.log_dir or tempfile.mkdtemp(prefix="dsi-cluster-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._failed = False

    def _spawn(self, name: str, role: str, args: list[str], port: int = 0) -> ServiceProcess:
        # start_new_session: Ctrl-C in a terminal reaches us only; we stop the children.
        sp = launch(name, serve_command(role, args, self.spec.host, port), self.log_dir / f"{name}.log",
                    self.spec.host, self.spec.extra_env, new_session=True)
        self.processes.append(sp)
        return sp

    def start(self) -> str:
        spec = self.spec
        try:
            tls = ClusterTLS(Path(spec.tls_dir)) if spec.tls_dir else None
            keys = ["--api-key-file", spec.api_key_file] if spec.api_key_file else []
            if not spec.target_model or (not spec.drafter_model and spec.oracle_acceptance <= 0):
                from dsi.default_pair import ensure_default_pair

                pair = ensure_default_pair()  # build the fallback pair once, before the services race for it
                target_model = spec.target_model or str(pair.target)
                drafter_model = spec.drafter_model or str(pair.drafter)
            else:
                target_model, drafter_model = spec.target_model, spec.drafter_model
            if spec.oracle_acceptance > 0:
                drafter_model = target_model
            common = ["--threads", str(spec.threads), "--device", spec.device, "--dtype", spec.dtype]
            targets = []
            for i in range(spec.targets):
                args = ["--model", target_model, *common, *(tls.model_service("target") if tls else [])]
                if spec.emulate_target_ms:
                    args += ["--emulate-latency-ms", spec.emulate_target_ms]
                targets.append(self._spawn(f"target-{i}", "target", args))
            args = ["--model", drafter_model, *common, *(tls.model_service("drafter") if tls else [])]
            if spec.emulate_drafter_ms:
                args += ["--emulate-latency-ms", spec.emulate_drafter_ms]
            if spec.oracle_acceptance > 0:
                args += ["--oracle-acceptance", str(spec.oracle_acceptance)]
            drafter = self._spawn("drafter", "drafter", args)
            deadline = time.monotonic() + spec.startup_timeout_s
            for sp in [*targets, drafter]:
                sp.wait_listening(deadline)  # the models load in parallel
            orch = self._spawn(
                "orchestrator",
                "orchestrator",
                ["--targets", ",".join(t.address for t in targets), "--drafter", drafter.address,
                 "--lookahead", str(spec.lookahead), "--startup-timeout-s", str(int(spec.startup_timeout_s)),
                 *(tls.orchestrator() if tls else []), *keys,
                 *(["--expose-internals"] if spec.exposes_internals else [])],
                spec.port,
            )
            orch.wait_listening(deadline)
            self.address = orch.address
            if spec.http_port is not None:
                # The tokenizer by name: the orchestrator may not tell its checkpoint's path.
                gateway_args = ["--orchestrator", orch.address, "--tokenizer", target_model, *keys]
                if tls:
                    gateway_args += tls.gateway()
                if spec.api_key_file:
                    gateway_args += ["--orchestrator-api-key-file", spec.api_key_file]
                gateway = self._spawn("gateway", "gateway", gateway_args, spec.http_port)
                self.http_address = gateway.wait_listening(deadline)
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
            stop_process(sp.process, max(0.1, deadline - time.monotonic()))
        self.processes.clear()
        if self._own_log_dir and not self._failed and not self.spec.keep_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
