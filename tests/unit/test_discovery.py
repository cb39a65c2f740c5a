"""Target discovery: dns:/// names expand into one endpoint per address (docker compose aliases and
--scale, Kubernetes headless Services), static endpoints pass through, bad specs are refused, and
re-resolution reports only real changes and survives resolver failures."""

from __future__ import annotations

import asyncio
import socket

import pytest

from dsi.services.orchestrator.discovery import (
    TargetDiscovery,
    format_address,
    resolve_targets,
    split_host_port,
    system_resolver,
)

pytestmark = pytest.mark.unit


class FakeResolver:
    """Answers from a table that the test edits; a name mapped to an exception raises it."""

    def __init__(self, table: dict[str, list[str] | BaseException]) -> None:
        self.table = table
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        answer = self.table.get(host)
        if answer is None:
            raise socket.gaierror(socket.EAI_NONAME, f"{host}: Name or service not known")
        if isinstance(answer, BaseException):
            raise answer
        return [format_address(ip, port) for ip in answer]


class Recorder:
    def __init__(self) -> None:
        self.changes: list[list[str]] = []

    def __call__(self, addresses: list[str]) -> None:
        self.changes.append(list(addresses))


def test_dns_name_expands_into_one_endpoint_per_address() -> None:
    resolver = FakeResolver({"targets": ["172.18.0.3", "172.18.0.4", "172.18.0.5"]})
    got = asyncio.run(resolve_targets(["dns:///targets:50061"], resolver))
    assert got == ["172.18.0.3:50061", "172.18.0.4:50061", "172.18.0.5:50061"]
    assert resolver.calls == [("targets", 50061)]


def test_static_endpoints_pass_through_in_order_and_duplicates_are_dropped() -> None:
    resolver = FakeResolver({"targets": ["10.0.0.2", "10.0.0.1"]})
    specs = ["gpu-box:50061", "dns:///targets:50061", "10.0.0.1:50061", "[fd00::7]:50061", "gpu-box:50061"]
    got = asyncio.run(resolve_targets(specs, resolver))
    assert got == ["gpu-box:50061", "10.0.0.2:50061", "10.0.0.1:50061", "[fd00::7]:50061"]
    # Static endpoints are never looked up: gRPC resolves them itself.
    assert resolver.calls == [("targets", 50061)]


def test_ipv6_addresses_are_bracketed_and_split_back() -> None:
    assert format_address("::1", 50061) == "[::1]:50061"
    assert format_address("10.0.0.1", 50061) == "10.0.0.1:50061"
    assert split_host_port("[::1]:50061") == ("::1", 50061)
    fqdn = "dsi-target.ns.svc.cluster.local"
    assert split_host_port(f"{fqdn}:50061") == (fqdn, 50061)
    resolver = FakeResolver({"v6": ["fd00::1", "fd00::2"]})
    assert asyncio.run(resolve_targets(["dns:///v6:7"], resolver)) == ["[fd00::1]:7", "[fd00::2]:7"]


def test_real_resolution_of_localhost() -> None:
    got = asyncio.run(resolve_targets(["dns:///localhost:50061"]))
    assert "127.0.0.1:50061" in got
    # localhost may also have ::1; nothing else, and no duplicates (getaddrinfo repeats per protocol).
    assert set(got) <= {"127.0.0.1:50061", "[::1]:50061"}
    assert len(got) == len(set(got))


def test_system_resolver_returns_every_address_sorted() -> None:
    got = asyncio.run(system_resolver("localhost", 9))
    assert got == sorted(set(got))
    assert "127.0.0.1:9" in got


@pytest.mark.parametrize(
    "spec",
    ["", "gpu-box", "gpu-box:", ":50061", "gpu-box:grpc", "gpu-box:-1", "dns:///targets", "dns:///:50061",
     "dns:///targets:port"],
)
def test_bad_specs_raise_value_error(spec: str) -> None:
    resolver = FakeResolver({"targets": ["10.0.0.1"]})
    with pytest.raises(ValueError, match="HOST:PORT"):
        asyncio.run(resolve_targets([spec], resolver))
    assert resolver.calls == []


def test_unresolvable_name_yields_nothing_but_keeps_the_other_specs() -> None:
    resolver = FakeResolver({})
    assert asyncio.run(resolve_targets(["dns:///nowhere:50061"], resolver)) == []
    mixed = ["dns:///nowhere:50061", "10.0.0.9:50061"]
    assert asyncio.run(resolve_targets(mixed, resolver)) == ["10.0.0.9:50061"]


def test_refresh_reports_only_changes() -> None:
    table: dict[str, list[str] | BaseException] = {"targets": ["10.0.0.1", "10.0.0.2"]}
    resolver = FakeResolver(table)
    seen = Recorder()
    discovery = TargetDiscovery(["dns:///targets:50061"], seen, interval_s=3600, resolver=resolver)
    assert discovery.dynamic

    async def scenario() -> None:
        assert await discovery.refresh() == ["10.0.0.1:50061", "10.0.0.2:50061"]
        await discovery.refresh()  # same answer: no call
        table["targets"] = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]  # docker compose up --scale
        await discovery.refresh()
        table["targets"] = ["10.0.0.3"]  # two replicas gone
        await discovery.refresh()
        await discovery.refresh()

    asyncio.run(scenario())
    assert seen.changes == [
        ["10.0.0.1:50061", "10.0.0.2:50061"],
        ["10.0.0.1:50061", "10.0.0.2:50061", "10.0.0.3:50061"],
        ["10.0.0.3:50061"],
    ]
    assert discovery.current == ["10.0.0.3:50061"]


def test_resolver_failure_keeps_the_last_good_set() -> None:
    table: dict[str, list[str] | BaseException] = {"targets": ["10.0.0.1", "10.0.0.2"]}
    resolver = FakeResolver(table)
    seen = Recorder()
    discovery = TargetDiscovery(["dns:///targets:50061"], seen, interval_s=3600, resolver=resolver)

    async def scenario() -> list[str]:
        await discovery.refresh()
        del table["targets"]  # NXDOMAIN, e.g. no ready pod behind a headless Service for a moment
        during_outage = await discovery.refresh()
        table["targets"] = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        assert await discovery.refresh() == during_outage
        table["targets"] = ["10.0.0.2", "10.0.0.4"]
        await discovery.refresh()
        return during_outage

    during_outage = asyncio.run(scenario())
    assert during_outage == ["10.0.0.1:50061", "10.0.0.2:50061"]
    assert seen.changes == [["10.0.0.1:50061", "10.0.0.2:50061"], ["10.0.0.2:50061", "10.0.0.4:50061"]]


def test_static_specs_are_not_re_resolved() -> None:
    seen = Recorder()
    discovery = TargetDiscovery(["10.0.0.1:50061", "10.0.0.2:50061"], seen, interval_s=0.01)
    assert not discovery.dynamic

    async def scenario() -> None:
        await discovery.refresh()
        discovery.start()  # nothing to re-resolve: no background task
        assert discovery._task is None
        await asyncio.sleep(0.05)

    asyncio.run(scenario())
    assert seen.changes == [["10.0.0.1:50061", "10.0.0.2:50061"]]


def test_background_loop_follows_changes_and_survives_errors() -> None:
    table: dict[str, list[str] | BaseException] = {"targets": ["10.0.0.1"]}
    resolver = FakeResolver(table)
    seen = Recorder()

    async def scenario() -> None:
        changed = asyncio.Event()

        def on_change(addresses: list[str]) -> None:
            seen(addresses)
            changed.set()

        discovery = TargetDiscovery(["dns:///targets:50061"], on_change, interval_s=0.01, resolver=resolver)
        await discovery.refresh()
        changed.clear()
        # An unexpected error inside the loop is logged and the loop goes on.
        table["targets"] = RuntimeError("resolver bug")
        discovery.start()
        try:
            await asyncio.sleep(0.05)
            assert discovery.current == ["10.0.0.1:50061"]
            table["targets"] = ["10.0.0.1", "10.0.0.2"]
            await asyncio.wait_for(changed.wait(), timeout=5.0)
        finally:
            await discovery.stop()
        assert discovery._task is None

    asyncio.run(scenario())
    assert seen.changes == [["10.0.0.1:50061"], ["10.0.0.1:50061", "10.0.0.2:50061"]]
def test_failure_of_one_name_keeps_its_last_addresses_beside_static_ones() -> None:
    table: dict[str, list[str] | BaseException] = {"targets": ["10.0.0.1", "10.0.0.2"]}
    seen = Recorder()
    discovery = TargetDiscovery(["gpu-box:50061", "dns:///targets:50061"], seen, 3600, FakeResolver(table))

    async def scenario() -> None:
        await discovery.refresh()
        table["targets"] = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        await discovery.refresh()

    asyncio.run(scenario())
    assert seen.changes == [["gpu-box:50061", "10.0.0.1:50061", "10.0.0.2:50061"]]


@pytest.mark.parametrize("spec", ["dns://8.8.8.8/targets:50061", "http://gpu-box:50061", "gpu-box:65536"])
def test_malformed_static_specs_raise_value_error(spec: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        asyncio.run(resolve_targets([spec], FakeResolver({})))
