"""Entry point of the gateway (``dsi serve gateway``): bind the HTTP port, serve the ASGI app with
uvicorn, and print 'dsi-gateway listening on HOST:PORT' once the orchestrator's model is known."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Iterator

import uvicorn

from dsi.services.gateway import settings as settings_mod
from dsi.services.gateway.app import build_app
from dsi.services.gateway.settings import GatewaySettings
from dsi.services.runtime.serving import configure_logging, run_async

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """SIGTERM/SIGINT start the graceful shutdown; unlike uvicorn's own handler, the signal is not
        raised again afterwards, so a clean stop exits 0."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that --port 0 gets a port we can report."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"dsi-gateway: cannot listen on {host}:{port}: {exc}") from exc
    sock.listen(2048)
    return sock


async def serve(settings: GatewaySettings) -> None:
    sock = bind(settings.server.host, settings.server.port)
    port = sock.getsockname()[1]

    def ready() -> None:
        # One line on stdout that launchers (dsi up, tests) wait for; logs go to stderr.
        print(f"dsi-gateway listening on {settings.server.host}:{port}", flush=True)

    app = build_app(settings, on_ready=ready)
    config = uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=int(max(1, settings.server.grace_s)),
                            lifespan="on", server_header=False)
    try:
        await _Server(config).serve(sockets=[sock])
    finally:
        sock.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings_mod.add_arguments(parser)


def main(ns: argparse.Namespace) -> int:
    settings = settings_mod.settings_from_args(ns)
    configure_logging(settings.log_level)
    run_async(lambda: serve(settings))
    return 0
