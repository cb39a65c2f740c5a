"""In-memory target and drafter with scripted latencies and acceptance, and a virtual-time loop."""

from __future__ import annotations

import asyncio
import hashlib
import selectors
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from dsi.services.orchestrator import policy
from dsi.services.orchestrator.placement import Placement, Running
from dsi.services.orchestrator.scheduler import Draft, WindowRequest, WindowResult, Yielded
from dsi.services.orchestrator.targets import TargetInstance

VOCAB = 50


def target_token(prefix: list[int]) -> int:
    """The scripted target: a deterministic function of the whole prefix."""
    digest = hashlib.blake2b(repr(prefix).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") % VOCAB


def coin(position: int, salt: int) -> float:
    digest = hashlib.blake2b(f"{position}:{salt}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") / 2**32


class _VirtualSelector(selectors.DefaultSelector):
    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None):  # type: ignore[override]
        if timeout is not None and timeout > 0:
            self._loop.now += timeout  # jump to the next timer instead of waiting
        return super().select(0)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock only moves when every task waits on a timer."""

    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(selector=_VirtualSelector(self))

    def time(self) -> float:
        return self.now


def run_virtual(coro_fn: Callable[[], object]) -> object:
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(coro_fn())  # type: ignore[arg-type]
    finally:
        loop.close()


@dataclass
class FakeTarget:
    """n instances; each Verify holds one for ``latency`` seconds (virtual)."""

    instances: int = 1
    latency: float = 1.0
    cancelled: int = 0
    completed: int = 0
    calls: list[WindowRequest] = field(default_factory=list)
    # Per session: seconds its windows held an instance, and how many got one.
    held_s: dict[str, float] = field(default_factory=dict)
    promotions: list[tuple[WindowRequest, int]] = field(default_factory=list)
    started: dict[str, int] = field(default_factory=dict)
    max_concurrent: int = 0
    _busy: int = 0
    _waiting: int = 0
    _sem: asyncio.Semaphore | None = None

    def sp_limit(self) -> int:
        return self.instances

    def spare(self) -> int:
        return max(0, self.instances - self._busy - self._waiting)

    def load(self) -> policy.Load:
        return policy.Load(self.spare())  # one request: nobody else uses the targets

    def end(self) -> None:
        pass

    def reprioritize(self, window: WindowRequest, rank: int) -> None:
        self.promotions.append((window, rank))

    async def verify(self, window: WindowRequest) -> WindowResult:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.instances)
        self.calls.append(window)
        loop = asyncio.get_running_loop()
        asked = loop.time()
        self._waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self._waiting -= 1
            window.timing.queued_s += loop.time() - asked
        held = loop.time()
        window.timing.acquired += 1
        self.started[window.session_id] = self.started.get(window.session_id, 0) + 1
        self._busy += 1
        self.max_concurrent = max(self.max_concurrent, self._busy)
        try:
            await asyncio.sleep(self.latency)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self._busy -= 1
            self._sem.release()
            window.timing.held_s += loop.time() - held
            self.held_s[window.session_id] = self.held_s.get(window.session_id, 0.0) + loop.time() - held
        self.completed += 1
        ids = window.token_ids
        tokens = [target_token(ids[:j]) for j in range(window.first_position, len(ids) + 1)]
        return WindowResult(tokens, target="fake", compute_s=self.latency)


class _Instances:
    """What ``Placement`` uses of ``Targets``: healthy instances without channels (nothing is called)."""

    def __init__(self, n: int) -> None:
        self.instances = [TargetInstance(f"target-{i}", None, None, None, healthy=True)  # type: ignore[arg-type]
                          for i in range(n)]
        self.health_interval_s = 1.0
        self.on_membership = None

    def all(self) -> list[TargetInstance]:
        return list(self.instances)

    def healthy_count(self) -> int:
        return sum(i.healthy for i in self.instances)


class PlacedTarget:
    """Target instances behind the pool's real ``Placement``: a window queues for an instance like in
    ``TargetPool._verify``, holds it for ``latency`` (virtual) unless preempted, and goes back to the
    queue when preempted. ``rerank=False`` drops re-ranking (a queued window keeps its rank)."""

    def __init__(self, instances: int, latency: float | Callable[[WindowRequest], float] = 1.0,
                 rerank: bool = True) -> None:
        self.targets = _Instances(instances)
        # Seconds one forward takes: fixed, or a function of the window.
        self.latency = latency if callable(latency) else (lambda _window, fixed=latency: fixed)
        self.placement = Placement(self.targets)  # type: ignore[arg-type]
        self.rerank = rerank
        self.yielding_preempted = 0  # yielding windows preempted (and dropped)

    async def verify(self, window: WindowRequest) -> WindowResult:
        loop = asyncio.get_running_loop()
        self.placement.track(window)
        try:
            while True:
                inst = await self.placement.acquire(window)
                window.timing.acquired += 1
                started = loop.time()
                inst.running = Running(window, self.placement.rank(window), started, loop.create_future())
                forward = asyncio.ensure_future(asyncio.sleep(self.latency(window)))
                try:
                    await asyncio.wait([forward, inst.running.preempt], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    computed = forward.done() and not forward.cancelled()
                    forward.cancel()
                    inst.running = None
                    window.timing.held_s += loop.time() - started
                    self.placement.release(inst)
                if computed:  # else preempted: back to the queue with its rank (a yielding one is dropped)
                    self.placement.verified(inst, window)
                    ids = window.token_ids
                    tokens = [target_token(ids[:j]) for j in range(window.first_position, len(ids) + 1)]
                    return WindowResult(tokens, inst.address, self.latency(window))
                window.timing.preempted += 1
                if window.yields:
                    self.yielding_preempted += 1
                    raise Yielded("preempted")
        finally:
            self.placement.untrack(window)


class RequestTarget:
    """One request's TargetClient over the shared instances (as ``PoolTargetClient``)."""

    def __init__(self, shared: PlacedTarget, session_id: str) -> None:
        self.shared, self.session_id = shared, session_id

    def sp_limit(self) -> int:
        return self.shared.targets.healthy_count()

    def load(self) -> policy.Load:
        return self.shared.placement.load(self.session_id)

    def end(self) -> None:
        self.shared.placement.ended(self.session_id)

    def reprioritize(self, window: WindowRequest, rank: int) -> None:
        if self.shared.rerank:
            self.shared.placement.reprioritize(window, rank)

    async def verify(self, window: WindowRequest) -> WindowResult:
        return await self.shared.verify(window)


class CreditStream:
    """A credit-based draft stream: sends as many drafts as granted, one per ``latency`` (virtual),
    waits idle for more grants, ends once its credit is used after ``end_grants``. Subclasses say what
    each draft is (``next_draft``, given the sequence so far)."""

    def __init__(self, prefix: list[int], max_tokens: int) -> None:
        self.prefix = list(prefix)
        self.credit = max_tokens
        self.grants: list[int] = [max_tokens]
        self.grants_ended = False
        self.cancelled = False
        self.urgent: list[int] = []
        self._wake = asyncio.Event()

    @property
    def latency(self) -> float:
        raise NotImplementedError

    def next_draft(self, seq: list[int]) -> Draft:
        raise NotImplementedError

    def grant(self, n: int) -> None:
        assert n >= 1, n
        self.credit += n
        self.grants.append(n)
        self._wake.set()

    def set_urgent(self, until: int) -> None:
        self.urgent.append(until)

    def end_grants(self) -> None:
        self.grants_ended = True
        self._wake.set()

    def cancel(self) -> None:
        self.cancelled = True
        self._wake.set()

    async def __aiter__(self) -> AsyncIterator[Draft]:  # type: ignore[override]
        seq = list(self.prefix)
        while True:
            while self.credit == 0 and not self.grants_ended and not self.cancelled:
                self._wake.clear()
                await self._wake.wait()
            if self.cancelled or self.credit == 0:
                return
            await asyncio.sleep(self.latency)
            if self.cancelled:
                return
            draft = self.next_draft(seq)
            seq.append(draft.token_id)
            self.credit -= 1
            yield draft


class FakeStream(CreditStream):
    """The drafter proposes the target's token with probability ``acceptance`` (a coin per position)."""

    def __init__(self, drafter: FakeDrafter, prefix: list[int], max_tokens: int) -> None:
        super().__init__(prefix, max_tokens)
        self.drafter = drafter

    @property
    def latency(self) -> float:
        return self.drafter.latency

    def cancel(self) -> None:
        if not self.cancelled:
            self.drafter.cancels += 1
        super().cancel()

    def next_draft(self, seq: list[int]) -> Draft:
        if self.drafter.fail_after is not None and self.drafter.produced >= self.drafter.fail_after:
            raise ConnectionError("drafter died")
        right = target_token(seq)
        token = right if coin(len(seq), self.drafter.salt) < self.drafter.acceptance else (right + 1) % VOCAB
        self.drafter.produced += 1
        return Draft(token)


@dataclass
class FakeDrafter:
    latency: float = 0.1
    acceptance: float = 0.8
    salt: int = 0
    cancels: int = 0
    produced: int = 0
    opened: int = 0
    fail_after: int | None = None

    streams: list[FakeStream] = field(default_factory=list)

    def open(self, session_id: str, prefix: list[int], max_tokens: int, return_probs: bool) -> FakeStream:
        self.opened += 1
        stream = FakeStream(self, prefix, max_tokens)
        self.streams.append(stream)
        return stream


def reference(prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(target_token(seq))
    return seq[len(prompt):]
