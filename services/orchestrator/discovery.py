"""Target discovery: static ``host:port`` endpoints, and ``dns:///NAME:PORT`` names that stand for
every address NAME resolves to (docker compose --scale, a Kubernetes headless Service), re-resolved
periodically so replicas can come and go."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence

log = logging.getLogger(__name__)

DNS_PREFIX = "dns:///"

Resolver = Callable[[str, int], Awaitable[list[str]]]


def split_host_port(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT (or {DNS_PREFIX}NAME:PORT), got {endpoint!r}")
    return host.strip("[]"), int(port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolver returns for host (A and AAAA), sorted and deduplicated."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({format_address(str(info[4][0]), port) for info in infos})


async def resolve_targets(
    specs: Sequence[str], resolver: Resolver = system_resolver, last_good: dict[str, list[str]] | None = None
) -> list[str]:
    """Expand the target specs into endpoint addresses (order kept, duplicates dropped).

    With ``last_good``, a name that fails to resolve keeps the addresses it last resolved to (and
    ``last_good`` is updated with every successful resolution)."""
    out: list[str] = []
    for spec in specs:
        if spec.startswith(DNS_PREFIX):
            host, port = split_host_port(spec[len(DNS_PREFIX) :])
            try:
                found = await resolver(host, port)
            except OSError as exc:
                found = (last_good or {}).get(spec, [])
                log.warning("could not resolve %s: %s (keeping its %d last addresses)", spec, exc, len(found))
            else:
                if last_good is not None and found:
                    last_good[spec] = found
            out.extend(found)
        else:
            split_host_port(spec)
            out.append(spec)
    return list(dict.fromkeys(out))


class TargetDiscovery:
    """Re-resolves the specs every ``interval_s`` and reports changes to ``on_change``."""

    def __init__(
        self,
        specs: Sequence[str],
        on_change: Callable[[list[str]], None],
        interval_s: float = 10.0,
        resolver: Resolver = system_resolver,
    ) -> None:
        self.specs = list(specs)
        self.on_change = on_change
        self.interval_s = interval_s
        self.resolver = resolver
        self.current: list[str] = []
        self._last_good: dict[str, list[str]] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def dynamic(self) -> bool:
        return any(s.startswith(DNS_PREFIX) for s in self.specs)

    async def refresh(self) -> list[str]:
        addresses = await resolve_targets(self.specs, self.resolver, self._last_good)
        if addresses and addresses != self.current:
            log.info("targets: %s", ", ".join(addresses))
            self.current = addresses
            self.on_change(addresses)
        return self.current

    def start(self) -> None:
        if self.dynamic and self._task is None:
            self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - keep the last good set
                log.exception("target re-resolution failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
