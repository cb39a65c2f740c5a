"""Running a grpc.aio server: health (NOT_SERVING until warmed up), reflection, limits, metrics
endpoint, and graceful shutdown on SIGTERM/SIGINT (health NOT_SERVING -> server.stop(grace))."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 0
    max_concurrent_rpcs: int = 256
    grace_s: float = 5.0
    metrics_port: int = 0


def install_uvloop() -> None:
    """Use uvloop for the event loop when it is installed (before any loop or channel exists)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but keep asyncio working
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run_async(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """asyncio.run with uvloop."""
    install_uvloop()
    asyncio.run(main())


class GrpcServer:
    """A grpc.aio server with health and reflection for the given service names."""

    def __init__(self, options: ServerOptions, service_names: Iterable[str], role: str) -> None:
        self.options = options
        self.role = role
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=options.max_concurrent_rpcs,
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.server)
        self._service_names = list(service_names)
        self.port = 0
        self._stop = asyncio.Event()

    async def start(self) -> int:
        self.port = self.server.add_insecure_port(f"{self.options.host}:{self.options.port}")
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.options.host}:{self.options.port}")
        await self._set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._stop.set)
            except (NotImplementedError, RuntimeError):  # pragma: no cover - non-main thread
                pass
        return self.port

    async def _set_status(self, status: int) -> None:
        for name in ["", *self._service_names]:
            await self.health.set(name, status)

    async def set_serving(self) -> None:
        await self._set_status(health_pb2.HealthCheckResponse.SERVING)
        # One line on stdout that launchers (dsi up, tests) wait for; logs go to stderr.
        print(f"dsi-{self.role} listening on {self.options.host}:{self.port}", flush=True)
        log.info("%s serving on %s:%d", self.role, self.options.host, self.port)

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_and_stop(self) -> None:
        await self._stop.wait()
        log.info("%s shutting down (grace %.1fs)", self.role, self.options.grace_s)
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.options.grace_s)


def start_metrics_server(port: int, registry: object) -> None:
    """Expose Prometheus metrics on http://0.0.0.0:port/metrics when port > 0."""
    if port <= 0:
        return
    from prometheus_client import start_http_server

    start_http_server(port, registry=registry)  # type: ignore[arg-type]
    log.info("metrics on :%d/metrics", port)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
