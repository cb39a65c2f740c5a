"""The pool of target instances: one window at a time per instance, the critical path first,
cache affinity, health checks, and retry of failed windows on another instance.

Speculation yields: when a request's critical window (rank 0) has to wait for an instance, the
pool preempts a speculative window (rank >= 1) running elsewhere, the most speculative first: its
forward is cancelled on the target (a real cancel, the session cache restored) and the window goes
back to the queue with its rank, to run again when an instance is free.

Incremental Verify: a window sends only what the chosen instance does not already hold of the
session (the rest referenced by length and prefix hash); the pool tracks what each instance holds
by reference to the last window it verified there and the request's committed length, so working
that out costs the window's uncommitted tail, not the whole sequence. A stale reference (evicted,
restarted, cut back by a cancel) fails with FAILED_PRECONDITION and is sent again in full.

Placement: a window prefers the instance that holds the most of its sequence. Where it would first
compute more than COLD_TOKENS tokens (a *cold* instance: a long prompt's prefill) it goes only onto
capacity nobody else needs: a speculative window does not start a cold prefill while an instance
is warm for its request (unless no other request uses the pool), and under load a critical window
takes a warm instance from speculation (preempting it) rather than prefill cold."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dsi.v1 import common_pb2, target_pb2, target_pb2_grpc
from services.orchestrator.metrics import OrchestratorMetrics
from services.orchestrator.scheduler import WindowRequest, WindowResult
from services.runtime import tls
from services.runtime.errors import Unavailable
from services.runtime.params import Sampling
from services.runtime.prefixes import PrefixHashes, common_prefix_len, extend
from services.runtime.serving import MAX_MESSAGE_BYTES
from services.runtime.validation import sampling_to_pb

log = logging.getLogger(__name__)

# A window that would first compute more than this many tokens on an instance (to catch its cache
# up to the first scored position) is cold there: a prefill, placed only on capacity nobody needs.
# Up to a few hundred tokens cost a GPU forward about what one token does (it is memory-bound).
COLD_TOKENS = 256

TARGET_SERVICE = "dsi.v1.TargetService"
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,  # the server cancelled it (shutting down); our own cancels never get here
}
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


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
    running: _Running | None = None
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
class Held:
    """An instance's cache holds tokens[:length] of a session: the token ids of the last window it
    verified there (by reference: a window's list is never changed), of which ``committed`` were
    committed. A call that failed or was cancelled there may have cut the cache back: ``length``
    then says how far it may have gone."""

    tokens: list[int]
    committed: int
    length: int


class InstanceDown(Exception):
    """The instance running a window was marked down (e.g. hung: health checks time out)."""


class Preempted(Exception):
    """A critical window needed the instance running this speculative one."""


@dataclass
class _Running:
    """The window an instance is computing, its rank now, and the signal that preempts it."""

    window: WindowRequest
    rank: int
    started: float
    preempt: asyncio.Future[None]


@dataclass(order=True)
class _Waiter:
    priority: tuple[int, int, int]
    future: asyncio.Future[TargetInstance] = field(compare=False)
    request: WindowRequest = field(compare=False)


class TargetPool:
    def __init__(
        self,
        addresses: list[str],
        deadline_s: float = 60.0,
        health_interval_s: float = 1.0,
        max_retries: int = 2,
        metrics: OrchestratorMetrics | None = None,
        incremental: bool = True,
        cold_tokens: int = COLD_TOKENS,
        headroom: int = 1,
        upstream_tls: tls.ClientTLS | None = None,
    ) -> None:
        self.upstream_tls = upstream_tls  # channels to the targets: None = plaintext, else (mutual) TLS
        self.deadline_s = deadline_s
        # Windows send only what the instance does not hold (False: always the whole sequence).
        self.incremental = incremental
        # More tokens than this to catch up on an instance = a cold prefill there (placement).
        self.cold_tokens = cold_tokens
        # Idle instances speculation leaves to other requests' critical windows while they run.
        self.headroom = headroom
        # Session id -> hashes of its committed prefix so far (it only grows).
        self._committed: dict[str, PrefixHashes] = {}
        self.health_interval_s = health_interval_s
        self.max_retries = max_retries
        self.metrics = metrics
        self.instances: dict[str, TargetInstance] = {}
        self._waiters: list[_Waiter] = []
        self._seq = itertools.count()
        self._health_task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._live_waiters = 0  # waiters not yet served nor cancelled (the heap also holds dead ones)
        # Called with the number of healthy instances whenever membership or health changes.
        self.on_change: Callable[[int], None] | None = None
        # Session id -> addresses of the instances that were sent any of its windows (for Release).
        self._sent: dict[str, set[str]] = {}
        # Rank now of each window being verified (id of its WindowRequest): reprioritize moves it up.
        self._ranks: dict[int, int] = {}
        # The model every instance must serve (set once the first targets agree at start-up): an
        # instance that comes up later, e.g. found by DNS or restarted, joins only if it matches.
        self.model: common_pb2.ModelInfo | None = None
        self._closes: set[asyncio.Task[None]] = set()  # channels of removed instances being closed
        self.set_addresses(addresses)

    # -- membership and health -------------------------------------------------------------------

    def set_addresses(self, addresses: list[str]) -> None:
        """Add new endpoints (unhealthy until their first health check) and retire vanished ones."""
        wanted = list(dict.fromkeys(addresses))
        for address in wanted:
            if address not in self.instances:
                channel = tls.channel(address, self.upstream_tls, CHANNEL_OPTIONS)
                self.instances[address] = TargetInstance(
                    address, channel, target_pb2_grpc.TargetServiceStub(channel), health_pb2_grpc.HealthStub(channel)
                )
                log.info("target %s added", address)
        for address in [a for a in self.instances if a not in wanted]:
            inst = self.instances.pop(address)
            inst.removed = True
            inst.healthy = False
            log.info("target %s removed", address)
            if not inst.busy:
                self._closing(inst.channel.close())
        self._signal()

    @property
    def addresses(self) -> list[str]:
        return list(self.instances)

    def healthy_count(self) -> int:
        return sum(1 for i in self.instances.values() if i.healthy)

    def sp_limit(self) -> int:
        return self.healthy_count()

    def spare(self, session_id: str | None = None) -> int:
        """Healthy instances idle now that no waiting window will take. For a session's speculation,
        while other requests use the pool: only those warm for it (when any instance is), and less
        a headroom of ``headroom`` instances kept for the other requests' critical windows (one
        they would otherwise have to preempt speculation for)."""
        free = self._free()
        spare = len(free) - self._live_waiters
        if session_id is not None and free and not self._quiet(session_id):
            warm = [i for i in self.instances.values() if i.healthy and self._warm(i, session_id)]
            if warm:
                free = [i for i in free if i in warm]
            spare = min(len(free) - self._live_waiters, spare - self.headroom)
        return max(0, spare)

    async def start(self) -> None:
        await self.check_health()
        self._health_task = asyncio.ensure_future(self._health_loop())

    def _closing(self, close: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(close)
        self._closes.add(task)
        task.add_done_callback(self._closes.discard)

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        await asyncio.gather(*self._closes, *(i.channel.close() for i in self.instances.values()),
                             return_exceptions=True)

    def require_model(self, model: common_pb2.ModelInfo) -> None:
        """From now on an instance becomes healthy only if it serves this model's vocabulary."""
        self.model = model

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

    async def wait_healthy(self, timeout_s: float, count: int = 1) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.healthy_count() < count:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await self.check_health()
            await asyncio.sleep(min(0.2, left))
        return True

    async def check_health(self) -> None:
        await asyncio.gather(*(self._check(i) for i in list(self.instances.values())))

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

    def _mark_down(self, inst: TargetInstance, error: str) -> None:
        if inst.healthy:
            log.warning("target %s marked down: %s", inst.address, error)
        inst.mark_down(error)
        self._signal()

    def _signal(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        self._hand_off()
        if self.metrics is not None:
            self.metrics.healthy_targets.set(self.healthy_count())
        if self.on_change is not None:
            self.on_change(self.healthy_count())

    # -- acquiring an instance -------------------------------------------------------------------

    @staticmethod
    def held_prefix(inst: TargetInstance, window: WindowRequest) -> int:
        """How many leading tokens of the window the instance's cache holds (by the pool's record).
        Both sequences start with the request's committed tokens up to the shorter committed length,
        so only what follows is compared: the cost is the windows' tails, not the sequence."""
        held = inst.sessions.get(window.session_id)
        if held is None:
            return 0
        common = common_prefix_len(held.tokens, window.token_ids, min(held.committed, window.committed, held.length))
        return min(common, held.length)

    def _unsure(self, inst: TargetInstance, window: WindowRequest, chunked: bool) -> None:
        """A call for the window failed or was cancelled on the instance: its cache now holds at most
        what both the record and the window start with, up to the first position scored (a cancelled
        forward is cut back there), or, with fixed-shape chunks, to an unknown chunk boundary."""
        held = inst.sessions.get(window.session_id)
        if held is None:
            return
        if chunked:
            del inst.sessions[window.session_id]
            return
        length = min(self.held_prefix(inst, window), window.first_position - 1)
        inst.sessions[window.session_id] = Held(held.tokens, min(held.committed, length), length)

    # -- placement -------------------------------------------------------------------------------

    def _warm(self, inst: TargetInstance, session_id: str) -> bool:
        """The instance computes a window of the session now, or lacks at most COLD_TOKENS of its
        committed sequence."""
        if inst.running is not None and inst.running.window.session_id == session_id:
            return True
        held = inst.sessions.get(session_id)
        committed = self._committed.get(session_id)
        return (len(committed) if committed is not None else 0) - (held.length if held else 0) <= self.cold_tokens

    def _cold(self, inst: TargetInstance, window: WindowRequest) -> bool:
        return window.first_position - 1 - self.held_prefix(inst, window) > self.cold_tokens

    def _quiet(self, session_id: str) -> bool:
        """No other request has a window running or waiting: idle capacity is this one's to use."""
        return all(
            i.running is None or i.running.window.session_id == session_id for i in self.instances.values()
        ) and all(w.future.done() or w.request.session_id == session_id for w in self._waiters)

    def _may_run(self, inst: TargetInstance, window: WindowRequest, rank: int) -> bool:
        """A critical window runs anywhere; a speculative one starts a cold prefill only when no
        instance is warm for its request or no other request uses the pool."""
        if rank == 0 or not self._cold(inst, window) or self._quiet(window.session_id):
            return True
        return not any(i.healthy and self._warm(i, window.session_id) for i in self.instances.values())

    def _warm_victim(self, window: WindowRequest) -> TargetInstance | None:
        """A warm instance for the window running a speculative window that may be preempted."""
        victims = [
            i for i in self.instances.values()
            if i.healthy and i.reserved is None and i.running is not None and i.running.rank > 0
            and not i.running.preempt.done() and not self._cold(i, window)
        ]
        return max(victims, key=lambda i: self.held_prefix(i, window), default=None)

    async def _take_over(self, victim: TargetInstance) -> TargetInstance | None:
        """Preempt the victim's speculative window and get its instance when the call ends (None if it
        went down meanwhile)."""
        assert victim.running is not None
        reserved: asyncio.Future[TargetInstance | None] = asyncio.get_running_loop().create_future()
        victim.reserved = reserved
        victim.running.preempt.set_result(None)
        try:
            return await reserved
        except asyncio.CancelledError:
            got = reserved.result() if reserved.done() and not reserved.cancelled() else None
            if got is not None:
                self._release(got)
            raise

    def _best(self, free: list[TargetInstance], request: WindowRequest) -> TargetInstance:
        """The free instance whose cache holds the longest prefix of the window (then the least used)."""
        return max(free, key=lambda i: (self.held_prefix(i, request), -i.busy_s))

    def _free(self) -> list[TargetInstance]:
        return [i for i in self.instances.values() if i.healthy and not i.busy]

    def _hand_off(self) -> None:
        """Give free instances to waiting windows, in queue order; a speculative window that may not
        start a cold prefill on any free instance keeps waiting, and the next one is served."""
        while self._waiters:
            free = self._free()
            if not free:
                return
            while self._waiters and self._waiters[0].future.done():
                heapq.heappop(self._waiters)
            if not self._waiters:
                return
            pick = self._first_that_may_run(free)
            if pick is None:
                return
            waiter, choices = pick
            if waiter is self._waiters[0]:
                heapq.heappop(self._waiters)
            else:
                self._waiters.remove(waiter)
                heapq.heapify(self._waiters)
            inst = self._best(choices, waiter.request)
            inst.busy = True
            waiter.future.set_result(inst)

    def _first_that_may_run(self, free: list[TargetInstance]) -> tuple[_Waiter, list[TargetInstance]] | None:
        """The first waiter in queue order that may run on one of the free instances, and those."""
        first = self._waiters[0]
        choices = [i for i in free if self._may_run(i, first.request, first.priority[0])]
        if choices:
            return first, choices
        for waiter in sorted(w for w in self._waiters[1:] if not w.future.done()):
            choices = [i for i in free if self._may_run(i, waiter.request, waiter.priority[0])]
            if choices:
                return waiter, choices
        return None

    async def _acquire(self, request: WindowRequest) -> TargetInstance:
        grace = time.monotonic() + max(2.0, 3 * self.health_interval_s)
        while self.healthy_count() == 0:
            if time.monotonic() > grace:
                raise Unavailable(self.unavailable_message())
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), timeout=self.health_interval_s)
            except asyncio.TimeoutError:
                await self.check_health()
        rank = self._ranks.get(id(request), request.rank)
        free = self._free()
        choices = [i for i in free if self._may_run(i, request, rank)] if free and not self._waiters else []
        if choices:
            inst = self._best(choices, request)
            if rank == 0 and self._cold(inst, request) and not self._quiet(request.session_id):
                # Rather than prefill cold under load, take a warm instance from speculation.
                victim = self._warm_victim(request)
                if victim is not None:
                    got = await self._take_over(victim)
                    return got if got is not None else await self._acquire(request)
            inst.busy = True
            return inst
        loop = asyncio.get_running_loop()
        waiter = _Waiter((rank, request.request_seq, next(self._seq)), loop.create_future(), request)
        heapq.heappush(self._waiters, waiter)
        self._live_waiters += 1
        self._report_queue()
        if rank == 0:
            self._preempt_for_critical()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self._release(waiter.future.result())
            raise
        finally:
            self._live_waiters -= 1
            # Cancelled waiters stay in the heap until popped; drop them once they are the majority.
            if len(self._waiters) > 2 * self._live_waiters + 64:
                self._waiters = [w for w in self._waiters if not w.future.done()]
                heapq.heapify(self._waiters)
            self._report_queue()

    def _report_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._live_waiters)

    def reprioritize(self, request: WindowRequest, rank: int) -> None:
        """Give a window its new rank: a waiting one takes its place in the queue (and may preempt
        speculation if it became critical); a running one is no longer preempted as it was."""
        key = id(request)
        if key in self._ranks:
            if rank >= self._ranks[key]:
                return
            self._ranks[key] = rank
        for inst in self.instances.values():
            if inst.running is not None and inst.running.window is request:
                inst.running.rank = min(rank, inst.running.rank)
                return
        for waiter in self._waiters:
            if waiter.request is request and not waiter.future.done():
                if rank >= waiter.priority[0]:
                    return
                waiter.priority = (rank, *waiter.priority[1:])
                heapq.heapify(self._waiters)
                if rank == 0:
                    self._preempt_for_critical()
                return

    def _preempt_for_critical(self) -> None:
        """Preempt running speculative windows, the most speculative first (then the newest
        request's, then the latest started: the queue's order backwards), until every waiting
        critical window has an instance coming."""
        critical = sum(1 for w in self._waiters if w.priority[0] == 0 and not w.future.done())
        running = [i.running for i in self.instances.values() if i.healthy and i.running is not None]
        # Instances already on their way (not those a critical window has taken over).
        critical -= sum(1 for i in self.instances.values()
                        if i.healthy and i.running is not None and i.running.preempt.done() and i.reserved is None)
        victims = sorted((r for r in running if r.rank > 0 and not r.preempt.done()),
                         key=lambda r: (r.rank, r.window.request_seq, r.started), reverse=True)
        for victim in victims[: max(0, critical)]:
            victim.preempt.set_result(None)

    def _release(self, inst: TargetInstance) -> None:
        inst.busy = False
        if inst.removed:
            asyncio.ensure_future(inst.channel.close())
        reserved, inst.reserved = inst.reserved, None
        if reserved is not None and not reserved.done():
            if inst.healthy and not inst.removed:
                inst.busy = True
                reserved.set_result(inst)
            else:
                reserved.set_result(None)  # it went down: the critical window queues as usual
        self._hand_off()

    def unavailable_message(self) -> str:
        tried = ", ".join(
            f"{i.address} ({i.last_error or 'not healthy'})" for i in self.instances.values()
        ) or "none configured"
        return f"no target instance reachable; endpoints tried: {tried}"

    # -- verifying a window ----------------------------------------------------------------------

    async def verify(
        self,
        window: WindowRequest,
        sampling: common_pb2.SamplingParams,
        request_id: str,
        chunking: tuple[int, int] | None = None,
    ) -> WindowResult:
        # Everything but the sequence, which depends on what the chosen instance holds.
        request = target_pb2.VerifyRequest(
            request_id=request_id,
            session_id=window.session_id,
            first_position=window.first_position,
            sampling=sampling,
        )
        if chunking is not None:
            request.chunk_origin, request.chunk_size = chunking
        for ids, probs in window.draft_probs or []:
            request.draft_probs.add(token_ids=ids, probs=probs)
        hashes = self._committed.setdefault(window.session_id, PrefixHashes())
        if len(hashes) < window.committed:
            hashes.append(window.token_ids[len(hashes) : window.committed])
        self._ranks[id(window)] = window.rank
        try:
            return await self._verify(window, request, request_id)
        finally:
            del self._ranks[id(window)]

    def _prefix_hash(self, window: WindowRequest, k: int) -> int:
        """The hash of the window's first k tokens: the committed prefix's is kept, the rest (a few
        drafts at most) hashed now."""
        hashes = self._committed[window.session_id]
        if k <= window.committed:
            return hashes.at(k)
        return extend(hashes.at(window.committed), window.token_ids[window.committed : k])

    def _sequence(
        self, request: target_pb2.VerifyRequest, window: WindowRequest, inst: TargetInstance, full: bool
    ) -> int:
        """Put into the request the part of the window's sequence the instance does not hold; returns
        how many leading tokens it references instead (prefix_length)."""
        k = 0 if full or not self.incremental else min(self.held_prefix(inst, window), window.first_position)
        del request.token_ids[:]
        request.token_ids.extend(window.token_ids[k:] if k else window.token_ids)
        request.prefix_length = k
        request.prefix_hash = self._prefix_hash(window, k) if k else 0
        return k

    async def _verify(self, window: WindowRequest, request: target_pb2.VerifyRequest, request_id: str) -> WindowResult:
        retries = 0
        full = False  # the instance did not hold a prefix it was sent by reference: send everything
        loop = asyncio.get_running_loop()
        while True:
            asked = time.perf_counter()
            try:
                inst = await self._acquire(window)
            finally:
                window.timing.queued_s += time.perf_counter() - asked
            window.timing.acquired += 1
            # Sent, so the instance may hold the session from now on, whatever the call's outcome.
            self._sent.setdefault(window.session_id, set()).add(inst.address)
            started = time.perf_counter()
            inst.running = _Running(window, self._ranks[id(window)], started, loop.create_future())
            referenced = self._sequence(request, window, inst, full)
            call = inst.stub.Verify(request, timeout=self.deadline_s)
            answered = False
            try:
                response = await self._answer_unless_down(call, inst, inst.running.preempt)
                answered = True
            except asyncio.CancelledError:
                call.cancel()  # a real cancel: the target stops its forward pass
                raise
            except Preempted:
                call.cancel()
                window.timing.preempted += 1
                continue  # back to the queue with its rank; the instance goes to the critical window
            except (grpc.aio.AioRpcError, InstanceDown) as exc:
                if isinstance(exc, grpc.aio.AioRpcError):
                    if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and referenced:
                        # Its cache no longer holds what the pool recorded: send the whole sequence.
                        inst.sessions.pop(window.session_id, None)
                        window.timing.acquired -= 1  # refused before any forward
                        full = True
                        if self.metrics is not None:
                            self.metrics.prefix_misses.inc()
                        continue
                    if exc.code() not in RETRYABLE:
                        raise
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        self._mark_down(inst, f"{exc.code().name}: {exc.details()}")
                    # RESOURCE_EXHAUSTED (device memory, or the target's call limit) is an overload:
                    # the instance stays in the pool and the window tries another one.
                reason = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "marked down"
                retries += 1
                if self.metrics is not None:
                    self.metrics.retries.inc()
                if retries > self.max_retries:
                    raise Unavailable(f"window failed {retries} times; {self.unavailable_message()}") from exc
                log.warning("request %s: retrying window on another target (%s)", request_id, reason)
                continue
            finally:
                inst.running = None
                if not answered:
                    self._unsure(inst, window, request.chunk_size > 0)
                elapsed = time.perf_counter() - started
                window.timing.held_s += elapsed
                inst.busy_s += elapsed
                if self.metrics is not None:
                    self.metrics.target_busy.labels(inst.address).inc(elapsed)
                self._release(inst)
            inst.sessions[window.session_id] = Held(window.token_ids, window.committed, len(window.token_ids))
            inst.sessions.move_to_end(window.session_id)
            while len(inst.sessions) > 1024:
                inst.sessions.popitem(last=False)
            return WindowResult(list(response.token_ids), inst.address, response.compute_s, retries)

    @staticmethod
    async def _answer_unless_down(
        call: Any, inst: TargetInstance, preempt: asyncio.Future[None]
    ) -> target_pb2.VerifyResponse:
        """The call's answer, or InstanceDown as soon as the instance is marked down (a hung target
        answers nothing until the deadline; its window is re-sent elsewhere at once instead), or
        Preempted when a critical window needs the instance (the call is cancelled)."""
        down = inst.down_signal()
        answer: asyncio.Future[target_pb2.VerifyResponse] = asyncio.ensure_future(call)
        try:
            await asyncio.wait([answer, down, preempt], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
        except asyncio.CancelledError:
            answer.cancel()  # cancels the RPC too
            raise
        if answer.done():
            return answer.result()
        answer.cancel()
        if preempt.done():
            raise Preempted(f"{inst.address} preempted for a critical window")
        raise InstanceDown(f"{inst.address} was marked down")

    async def release_session(self, session_id: str) -> None:
        """Drop the session on every instance that was ever sent one of its windows (the target
        creates it before the forward, so a window cancelled or failed there leaves one too)."""
        sent = self._sent.pop(session_id, set())
        self._committed.pop(session_id, None)
        holders = [
            i for i in self.instances.values() if (i.sessions.pop(session_id, None) is not None) or i.address in sent
        ]
        await asyncio.gather(
            *(i.stub.Release(target_pb2.TargetReleaseRequest(session_id=session_id), timeout=5.0) for i in holders),
            return_exceptions=True,
        )


class PoolTargetClient:
    """The scheduler's TargetClient for one request."""

    def __init__(
        self,
        pool: TargetPool,
        sampling: Sampling,
        request_id: str,
        chunking: tuple[int, int] | None = None,
    ) -> None:
        self.pool = pool
        self.sampling = sampling_to_pb(sampling)
        self.request_id = request_id
        # (chunk_origin, chunk_size) of fixed-shape target forwards (--reproducible); None = off.
        self.chunking = chunking

    def sp_limit(self) -> int:
        return self.pool.sp_limit()

    def spare(self) -> int:
        return self.pool.spare(self.request_id)

    def reprioritize(self, window: WindowRequest, rank: int) -> None:
        self.pool.reprioritize(window, rank)

    async def verify(self, window: WindowRequest) -> WindowResult:
        return await self.pool.verify(window, self.sampling, self.request_id, self.chunking)
