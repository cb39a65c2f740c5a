"""Membership and health of the target instances: who is in the pool (configured, or found by DNS),
who is healthy (health checks, and calls that fail), and who may join (the same vocabulary as the
pool's targets). Placement (``placement.py``) and the retrying verifier (``pool.py``) build on it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dsi.services.orchestrator.metrics import OrchestratorMetrics
from dsi.services.runtime import tls
from dsi.services.runtime.serving import MAX_MESSAGE_BYTES
from dsi.v1 import common_pb2, target_pb2, target_pb2_grpc

if TYPE_CHECKING:
    from dsi.services.orchestrator.placement import Running

log = logging.getLogger(__name__)

TARGET_SERVICE = "dsi.v1.TargetService"
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


@dataclass(frozen=True)
class Held:
    """An instance's cache holds tokens[:length] of a session: the token ids of the last window it
    verified there (by reference: a window's list is never changed), of which ``committed`` were
    committed. A call that failed or was cancelled there may have cut the cache back: ``length``
    then says how far it may have gone."""

    tokens: list[int]
    committed: int
    length: int


@dataclass
class TargetInstance:
    address: str
    channel: grpc.aio.Channel
    stub: target_pb2_grpc.TargetServiceStub
    health: health_pb2_grpc.HealthStub
    healthy: bool = False
    busy: bool = False
    removed: bool = False
    busy_s: float = 0.0
    last_error: str = ""
    # What this instance's cache holds per session, most recent last.
    sessions: OrderedDict[str, Held] = field(default_factory=OrderedDict)
    # Resolved when the instance is marked down: windows running on it stop waiting and go elsewhere.
    _down: asyncio.Future[None] | None = None
    running: Running | None = None
    # A critical window that preempted this instance's speculative window waits for it here.
    reserved: asyncio.Future[TargetInstance | None] | None = None

    def down_signal(self) -> asyncio.Future[None]:
        """A future resolved the next time this instance is marked down."""
        if self._down is None or self._down.done():
            self._down = asyncio.get_running_loop().create_future()
        return self._down

    def mark_down(self, error: str) -> None:
        self.healthy = False
        self.last_error = error
        self.sessions.clear()
        if self._down is not None and not self._down.done():
            self._down.set_result(None)


def model_mismatch(expected: common_pb2.ModelInfo, got: common_pb2.ModelInfo) -> str:
    """Why a target serving ``got`` cannot join a pool serving ``expected`` ('' = it can): every
    instance must score the same vocabulary (the same number of logits and the same tokenizer)."""
    if got.vocab_size != expected.vocab_size:
        return f"{got.vocab_size} logits where the pool's targets have {expected.vocab_size}"
    if got.vocab_fingerprint != expected.vocab_fingerprint:
        return (f"a different vocabulary (hash {got.vocab_fingerprint or 'unknown'} where the pool's targets "
                f"have {expected.vocab_fingerprint or 'unknown'})")
    return ""



@dataclass(frozen=True)
class TargetSnapshot:
    """One instance as Info and the metrics see it."""

    address: str
    healthy: bool
    busy: bool
    busy_s: float
    last_error: str
    sessions: int


class Targets:
    """The instances by address, their health, and who may join."""

    def __init__(
        self,
        addresses: list[str],
        health_interval_s: float = 1.0,
        metrics: OrchestratorMetrics | None = None,
        upstream_tls: tls.ClientTLS | None = None,
    ) -> None:
        self.upstream_tls = upstream_tls  # channels to the targets: None = plaintext, else (mutual) TLS
        self.health_interval_s = health_interval_s
        self.metrics = metrics
        self._instances: dict[str, TargetInstance] = {}
        self._health_task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        # Called with the number of healthy instances whenever membership or health changes.
        self.on_change: Callable[[int], None] | None = None
        # Called (first) on every change: placement hands free instances to waiting windows.
        self.on_membership: Callable[[], None] | None = None
        # The model every instance must serve (set once the first targets agree at start-up): an
        # instance that comes up later, e.g. found by DNS or restarted, joins only if it matches.
        self.model: common_pb2.ModelInfo | None = None
        self._closes: set[asyncio.Task[None]] = set()  # channels of removed instances being closed
        self.set_addresses(addresses)

    # -- membership ------------------------------------------------------------------------------

    def set_addresses(self, addresses: list[str]) -> None:
        """Add new endpoints (unhealthy until their first health check) and retire vanished ones."""
        wanted = list(dict.fromkeys(addresses))
        for address in wanted:
            if address not in self._instances:
                channel = tls.channel(address, self.upstream_tls, CHANNEL_OPTIONS)
                self._instances[address] = TargetInstance(
                    address, channel, target_pb2_grpc.TargetServiceStub(channel), health_pb2_grpc.HealthStub(channel)
                )
                log.info("target %s added", address)
        for address in [a for a in self._instances if a not in wanted]:
            inst = self._instances.pop(address)
            inst.removed = True
            inst.healthy = False
            log.info("target %s removed", address)
            if not inst.busy:
                self.close_channel(inst)
        self._signal()

    @property
    def addresses(self) -> list[str]:
        return list(self._instances)

    def all(self) -> list[TargetInstance]:
        return list(self._instances.values())

    def get(self, address: str) -> TargetInstance | None:
        return self._instances.get(address)

    def healthy_count(self) -> int:
        return sum(1 for i in self._instances.values() if i.healthy)

    def snapshot(self) -> list[TargetSnapshot]:
        return [TargetSnapshot(i.address, i.healthy, i.busy, i.busy_s, i.last_error, len(i.sessions))
                for i in self._instances.values()]

    def require_model(self, model: common_pb2.ModelInfo) -> None:
        """From now on an instance becomes healthy only if it serves this model's vocabulary."""
        self.model = model

    def unavailable_message(self) -> str:
        tried = ", ".join(
            f"{i.address} ({i.last_error or 'not healthy'})" for i in self._instances.values()
        ) or "none configured"
        return f"no target instance reachable; endpoints tried: {tried}"

    def close_channel(self, inst: TargetInstance) -> None:
        """Close a removed instance's channel (owned: ``close`` waits for it)."""
        task = asyncio.create_task(inst.channel.close())
        self._closes.add(task)
        task.add_done_callback(self._closes.discard)

    # -- health ----------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.check_health()
        self._health_task = asyncio.create_task(self._health_loop())

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        await asyncio.gather(*self._closes, *(i.channel.close() for i in self._instances.values()),
                             return_exceptions=True)

    async def wait_healthy(self, timeout_s: float, count: int = 1) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.healthy_count() < count:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await self.check_health()
            await asyncio.sleep(min(0.2, left))
        return True

    async def wait_for_change(self, timeout_s: float) -> None:
        """Until membership or health changes, or ``timeout_s`` passed (then a health round runs)."""
        changed = self._changed
        try:
            await asyncio.wait_for(changed.wait(), timeout=timeout_s)
        except asyncio.TimeoutError:
            await self.check_health()

    async def check_health(self) -> None:
        await asyncio.gather(*(self._check(i) for i in list(self._instances.values())))

    async def _incompatibility(self, inst: TargetInstance) -> str:
        """Why this instance, serving again, may not join the pool ('' = it may)."""
        if self.model is None:
            return ""
        try:
            info = await inst.stub.Info(target_pb2.TargetInfoRequest(), timeout=5.0)
        except grpc.aio.AioRpcError as exc:
            return f"Info failed: {exc.code().name}"
        mismatch = model_mismatch(self.model, info.model)
        return f"incompatible: it serves {mismatch}" if mismatch else ""

    async def _check(self, inst: TargetInstance) -> None:
        try:
            resp = await inst.health.Check(health_pb2.HealthCheckRequest(service=TARGET_SERVICE), timeout=2.0)
            ok = resp.status == health_pb2.HealthCheckResponse.SERVING
            error = "" if ok else "not serving"
        except grpc.aio.AioRpcError as exc:
            ok, error = False, f"{exc.code().name}: {exc.details()}"
        except asyncio.CancelledError:
            # set_addresses() closed a removed instance's channel under this check, which cancels the
            # call; only a cancel of the task itself (shutdown) may end the health loop.
            task = asyncio.current_task()
            if not inst.removed or (task is not None and task.cancelling()):
                raise
            return
        if ok and not inst.healthy and not inst.removed:
            error = await self._incompatibility(inst)
            if error:
                ok = False
                if error != inst.last_error:
                    log.error("target %s stays out of the pool: %s", inst.address, error)
                inst.last_error = error
        if not ok and not inst.healthy:
            inst.last_error = error  # also for one never healthy: unavailable_message names the reason
        if ok != inst.healthy and not inst.removed:
            log.info("target %s is %s%s", inst.address, "up" if ok else "down", f" ({error})" if error else "")
            inst.healthy = ok
            if not ok:
                inst.mark_down(error)
            self._signal()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                await self.check_health()
            except Exception:  # noqa: BLE001 - keep probing whatever happens
                log.exception("health check round failed")

    def mark_down(self, inst: TargetInstance, error: str) -> None:
        if inst.healthy:
            log.warning("target %s marked down: %s", inst.address, error)
        inst.mark_down(error)
        self._signal()

    def _signal(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        if self.on_membership is not None:
            self.on_membership()
        if self.metrics is not None:
            self.metrics.healthy_targets.set(self.healthy_count())
        if self.on_change is not None:
            self.on_change(self.healthy_count())
