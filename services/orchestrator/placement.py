"""Placement: which window gets which target instance, and when.

One window at a time per instance; waiting windows queue by rank (0 = a request's critical path),
then first come first served (``policy.queue_key``). Speculation yields: when a critical window has
to wait, a running speculative window (rank >= 1) is preempted, the most speculative first: its
forward is cancelled on the target (a real cancel, the session cache restored) and the window goes
back to the queue with its rank. A yielding window (``policy.yielding_window``) is preempted before
any speculation and is then dropped (``Yielded``), as it is when no instance is idle for it.

Affinity: a window prefers the instance that holds the most of its sequence, by the records of
what each instance holds (``Held``, by reference to the last window it verified there, and the
request's committed prefix hashes), so working that out costs the window's uncommitted tail. Where a
window would first compute more than COLD_TOKENS tokens (a *cold* instance: a long prompt's
prefill) it goes only onto capacity nobody else needs: no window starts a cold prefill while an
instance is warm for its request (unless no other request uses the pool); under load a critical
window takes a warm instance from speculation, or waits for one, rather than prefill cold.

Prefill budget: even alone on the pool, a request's windows start a cold prefill that is not needed
(another healthy instance holds the session, or computes it now) only while the committed tokens
its cold prefills started, this one included, stay within ``prefill_budget`` x its committed
length (what plain decoding has computed for it so far; the first prefill, which plain decoding
pays too, counts; tokens started are not refunded when a forward is cancelled). At the default of
1.5 a long prompt is prefilled once; a short prompt is not cold (at most COLD_TOKENS) until its
request has generated past COLD_TOKENS, so its speculation spreads over every idle instance as
before; ``inf`` prefills every idle instance, trading target time nobody else wants for speed.
Prefills no instance could avoid (none holds the session) are never limited."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from dataclasses import dataclass, field

from dsi.services.orchestrator import policy
from dsi.services.orchestrator.metrics import OrchestratorMetrics
from dsi.services.orchestrator.scheduler import WindowRequest, Yielded
from dsi.services.orchestrator.targets import Held, TargetInstance, Targets
from dsi.services.runtime.errors import Unavailable
from dsi.services.runtime.prefixes import PrefixHashes, common_prefix_len

# A window that would first compute more than this many tokens on an instance (to catch its cache
# up to the first scored position) is cold there: a prefill, placed only on capacity nobody needs.
# Up to a few hundred tokens cost a GPU forward about what one token does (it is memory-bound).
COLD_TOKENS = 256
# Committed tokens a request's cold prefills may start, as a multiple of its committed length (the
# first, needed prefill included): at most 1.5x plain decoding's prefill work.
PREFILL_BUDGET = 1.5
# Sessions whose holdings the placement remembers per instance (least recently used dropped).
HELD_PER_INSTANCE = 1024


class Preempted(Exception):
    """A critical window needed the instance running this speculative one."""


@dataclass
class Running:
    """The window an instance is computing, its rank now, and the signal that preempts it."""

    window: WindowRequest
    rank: int
    started: float
    preempt: asyncio.Future[None]


@dataclass(order=True)
class _Waiter:
    priority: tuple[int, int]
    future: asyncio.Future[TargetInstance] = field(compare=False)
    request: WindowRequest = field(compare=False)


def held_prefix(inst: TargetInstance, window: WindowRequest) -> int:
    """How many leading tokens of the window the instance's cache holds (by the records). Both
    sequences start with the request's committed tokens up to the shorter committed length, so only
    what follows is compared: the cost is the windows' tails, not the sequence."""
    held = inst.sessions.get(window.session_id)
    if held is None:
        return 0
    common = common_prefix_len(held.tokens, window.token_ids, min(held.committed, window.committed, held.length))
    return min(common, held.length)


class Placement:
    """The queue of windows waiting for an instance, preemption, and affinity."""

    def __init__(
        self,
        targets: Targets,
        cold_tokens: int = COLD_TOKENS,
        headroom: int = 1,
        metrics: OrchestratorMetrics | None = None,
        prefill_budget: float = PREFILL_BUDGET,
    ) -> None:
        self.targets = targets
        # More tokens than this to catch up on an instance = a cold prefill there.
        self.cold_tokens = cold_tokens
        # Idle instances speculation leaves to other requests' critical windows while they run.
        self.headroom = headroom
        self.metrics = metrics
        # Cold prefill tokens a request may start, as a multiple of its committed length.
        self.prefill_budget = prefill_budget
        # Session id -> hashes of its committed prefix so far (it only grows).
        self.committed: dict[str, PrefixHashes] = {}
        # Session id -> committed tokens of the cold prefills it started so far.
        self._prefilled: dict[str, int] = {}
        # Requests under way: from their first window until their scheduler ends (``ended``).
        self._active: set[str] = set()
        self._waiters: list[_Waiter] = []
        self._seq = itertools.count()
        self._live_waiters = 0  # waiters not yet served nor cancelled (the heap also holds dead ones)
        # Rank now of each window being verified (id of its WindowRequest): reprioritize moves it up.
        self._ranks: dict[int, int] = {}
        targets.on_membership = self._hand_off

    # -- the records of what instances hold ------------------------------------------------------

    def track(self, window: WindowRequest) -> None:
        """A window starts being verified: its committed prefix is recorded, its rank followed."""
        hashes = self.committed.setdefault(window.session_id, PrefixHashes())
        self._active.add(window.session_id)
        if len(hashes) < window.committed:
            hashes.append(window.token_ids[len(hashes) : window.committed])
        self._ranks[id(window)] = window.rank

    def untrack(self, window: WindowRequest) -> None:
        del self._ranks[id(window)]

    def rank(self, window: WindowRequest) -> int:
        return self._ranks.get(id(window), window.rank)

    def verified(self, inst: TargetInstance, window: WindowRequest) -> None:
        """The instance verified the window: its cache holds the window's sequence."""
        inst.sessions[window.session_id] = Held(window.token_ids, window.committed, len(window.token_ids))
        inst.sessions.move_to_end(window.session_id)
        while len(inst.sessions) > HELD_PER_INSTANCE:
            inst.sessions.popitem(last=False)

    def ended(self, session_id: str) -> None:
        """The session's request is over (its windows cancelled): no longer under way for the others,
        even while its answer is still being read and its release is to come."""
        self._active.discard(session_id)

    def forget(self, session_id: str) -> list[TargetInstance]:
        """Drop a finished session's records; the instances that held it."""
        self.committed.pop(session_id, None)
        self._prefilled.pop(session_id, None)
        self._active.discard(session_id)
        return [i for i in self.targets.all() if i.sessions.pop(session_id, None) is not None]

    def spare(self, session_id: str | None = None) -> int:
        """Healthy instances idle now that no waiting window will take. For a session's speculation,
        once an instance is warm for it: only those warm for it, or (alone on the pool) those its
        prefill budget still allows; while other requests use the pool, also less a headroom of
        ``headroom`` instances kept for the other requests' critical windows (one they would
        otherwise have to preempt speculation for)."""
        if session_id is None:
            free = self._free()
            return policy.spare_targets(len(free), self._live_waiters, True, None, self.headroom)
        return self.load(session_id).spare_targets

    def load(self, session_id: str) -> policy.Load:
        """The pool as the session's dispatch rules see it (``policy.Load``): spare instances (as
        ``spare``), the other requests under way, and the instances a request alone on the pool is
        confined to by its prefill budget. Each set is worked out once (it runs at every draft)."""
        others = self._others(session_id)
        under_way = self._under_way(session_id, others)
        allowed = self._allowed(session_id, alone=not under_way)
        free = self._free()
        usable = None if allowed is None or not free else sum(1 for i in free if i in allowed)
        spare = policy.spare_targets(len(free), self._live_waiters, not free or not others, usable, self.headroom)
        confined = None
        if not under_way and allowed is not None and len(allowed) < self.targets.healthy_count():
            confined = len(allowed)  # alone on the pool but its prefill budget spent
        return policy.Load(spare, len(under_way), confined)

    def _allowed(self, session_id: str, alone: bool) -> list[TargetInstance] | None:
        """The healthy instances the session's speculation may use (None: all, as none is warm for it
        yet): those warm for it, and ``alone`` on the pool (no other request under way) those its
        prefill budget allows."""
        healthy = [i for i in self.targets.all() if i.healthy]
        warm = [i for i in healthy if self._warm(i, session_id)]
        if not warm:
            return None
        if not alone:
            return warm
        committed = self.committed.get(session_id)
        length = len(committed) if committed is not None else 0
        allowed, cost = list(warm), 0
        for inst in sorted((i for i in healthy if i not in warm), key=lambda i: -self._held(i, session_id)):
            cost += max(0, length - self._held(inst, session_id))  # the cheapest prefills first, together
            if not self._within_budget(session_id, cost):
                break
            allowed.append(inst)
        return allowed

    @staticmethod
    def _held(inst: TargetInstance, session_id: str) -> int:
        held = inst.sessions.get(session_id)
        return held.length if held is not None else 0

    def _within_budget(self, session_id: str, tokens: int) -> bool:
        """Cold prefills of ``tokens`` more committed tokens keep the session within its budget."""
        committed = self.committed.get(session_id)
        length = max(1, len(committed) if committed is not None else 0)
        return self._prefilled.get(session_id, 0) + tokens <= self.prefill_budget * length

    def unsure(self, inst: TargetInstance, window: WindowRequest, chunked: bool) -> None:
        """A call for the window failed or was cancelled on the instance: its cache now holds at most
        what both the record and the window start with, up to the first position scored (a cancelled
        forward is cut back there), or, with fixed-shape chunks, to an unknown chunk boundary."""
        held = inst.sessions.get(window.session_id)
        if held is None:
            return
        if chunked:
            del inst.sessions[window.session_id]
            return
        length = min(held_prefix(inst, window), window.first_position - 1)
        inst.sessions[window.session_id] = Held(held.tokens, min(held.committed, length), length)

    # -- placement -------------------------------------------------------------------------------

    def _warm(self, inst: TargetInstance, session_id: str) -> bool:
        """The instance computes a window of the session now, or lacks at most COLD_TOKENS of its
        committed sequence."""
        if inst.running is not None and inst.running.window.session_id == session_id:
            return True
        committed = self.committed.get(session_id)
        return (len(committed) if committed is not None else 0) - self._held(inst, session_id) <= self.cold_tokens

    def _cold(self, inst: TargetInstance, window: WindowRequest) -> bool:
        return self._fill(inst, window) > self.cold_tokens

    def _warm_soon(self, inst: TargetInstance, window: WindowRequest) -> bool:
        """The instance computes a window of the same session now (its prompt's prefill, say), after
        which it will hold enough of this window not to be cold for it."""
        run = inst.running
        if run is None or run.window.session_id != window.session_id:
            return False
        start = min(run.window.committed, window.committed)
        will_hold = common_prefix_len(run.window.token_ids, window.token_ids, start)
        return window.first_position - 1 - will_hold <= self.cold_tokens

    def _others(self, session_id: str) -> set[str]:
        """The other sessions with a window running or waiting."""
        others = {i.running.window.session_id for i in self.targets.all() if i.running is not None}
        others |= {w.request.session_id for w in self._waiters if not w.future.done()}
        others.discard(session_id)
        return others

    def _under_way(self, session_id: str, others: set[str] | None = None) -> set[str]:
        """The other requests under way: with a window on the targets (``others``, when already
        worked out), or between two (drafting their next), from their first window until their
        scheduler ends (``ended``)."""
        return (self._active | (self._others(session_id) if others is None else others)) - {session_id}

    def _may_run(self, inst: TargetInstance, window: WindowRequest) -> bool:
        """A window starts a cold prefill only when no healthy instance could compute it warm, nor
        computes a window of its session now that will leave it warm (the prompt's prefill): under
        load a critical window, too, waits for an instance that holds its session (behind the
        windows queued before it) rather than recompute the prompt elsewhere. With the pool to
        itself (no other request under way) a request may prefill another instance while its prefill
        budget lasts. Judged per
        window (not by ``_warm``, which looks at the committed prefix only): an instance that holds
        the session's committed prefix but not this window's drafts far enough is no better than a
        cold one, and must not keep the window waiting."""
        if not self._cold(inst, window):
            return True
        # An instance computing the session's prefill now counts as warm: the windows that follow
        # it wait for it rather than prefill the prompt again elsewhere.
        needed = not any(
            i.healthy and (not self._cold(i, window) or self._warm_soon(i, window)) for i in self.targets.all()
        )
        if needed:
            return True
        alone = not self._under_way(window.session_id)
        return alone and self._within_budget(window.session_id, self._catch_up(inst, window))

    @staticmethod
    def _fill(inst: TargetInstance, window: WindowRequest) -> int:
        """Tokens the instance computes before the window's first scored position."""
        return window.first_position - 1 - held_prefix(inst, window)

    @staticmethod
    def _catch_up(inst: TargetInstance, window: WindowRequest) -> int:
        """Committed tokens of the window the instance lacks (its drafts not counted: some instance
        computes those anyway), what the prefill budget is charged."""
        return max(0, window.committed - held_prefix(inst, window))

    def _give(self, inst: TargetInstance, window: WindowRequest) -> None:
        """The instance is the window's: a cold prefill there counts against the session's budget."""
        inst.busy = True
        if self._cold(inst, window):
            charged = self._prefilled.get(window.session_id, 0)
            self._prefilled[window.session_id] = charged + self._catch_up(inst, window)

    def _warm_victim(self, window: WindowRequest) -> TargetInstance | None:
        """A warm instance for the window running a speculative window that may be preempted."""
        victims = [
            i for i in self.targets.all()
            if i.healthy and i.reserved is None and i.running is not None
            and (i.running.rank > 0 or i.running.window.yields)
            and not i.running.preempt.done() and not self._cold(i, window)
        ]
        # Yielding windows first (``policy.preemption_victims``), then the instance holding the most.
        return max(victims, key=lambda i: (i.running is not None and i.running.window.yields, held_prefix(i, window)),
                   default=None)

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
                self.release(got)
            raise

    def _best(self, free: list[TargetInstance], request: WindowRequest) -> TargetInstance:
        """The free instance whose cache holds the longest prefix of the window (then the least used)."""
        return max(free, key=lambda i: (held_prefix(i, request), -i.busy_s))

    def _free(self) -> list[TargetInstance]:
        return [i for i in self.targets.all() if i.healthy and not i.busy]

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
            self._give(inst, waiter.request)
            waiter.future.set_result(inst)

    def _first_that_may_run(self, free: list[TargetInstance]) -> tuple[_Waiter, list[TargetInstance]] | None:
        """The first waiter in queue order that may run on one of the free instances, and those."""
        first = self._waiters[0]
        choices = [i for i in free if self._may_run(i, first.request)]
        if choices:
            return first, choices
        for waiter in sorted(w for w in self._waiters[1:] if not w.future.done()):
            choices = [i for i in free if self._may_run(i, waiter.request)]
            if choices:
                return waiter, choices
        return None

    async def acquire(self, request: WindowRequest) -> TargetInstance:
        """An instance for the window, once its turn comes (``release`` it after the call)."""
        if request.yields:
            return self._idle_for_yielding(request)
        interval = self.targets.health_interval_s
        grace = time.monotonic() + max(2.0, 3 * interval)
        while self.targets.healthy_count() == 0:
            if time.monotonic() > grace:
                raise Unavailable(self.targets.unavailable_message())
            await self.targets.wait_for_change(interval)
        rank = self.rank(request)
        free = self._free()
        choices = [i for i in free if self._may_run(i, request)] if free and not self._waiters else []
        if choices:
            inst = self._best(choices, request)
            self._give(inst, request)
            return inst
        if rank == 0 and free and not self._waiters:
            # Every free instance is cold for it under load: take a warm one from speculation, or wait.
            victim = self._warm_victim(request)
            if victim is not None:
                got = await self._take_over(victim)
                return got if got is not None else await self.acquire(request)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(policy.queue_key(rank, next(self._seq)), loop.create_future(), request)
        heapq.heappush(self._waiters, waiter)
        self._live_waiters += 1
        self._report_queue()
        # Instances may be free that the windows queued before it may not use (cold for them).
        self._hand_off()
        if rank == 0 and not waiter.future.done():
            self._preempt_for_critical()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(waiter.future.result())
            raise
        finally:
            self._live_waiters -= 1
            # Cancelled waiters stay in the heap until popped; drop them once they are the majority.
            if len(self._waiters) > 2 * self._live_waiters + 64:
                self._waiters = [w for w in self._waiters if not w.future.done()]
                heapq.heapify(self._waiters)
            self._report_queue()

    def _idle_for_yielding(self, request: WindowRequest) -> TargetInstance:
        """A yielding window takes an instance idle now that no live waiting window may use (those
        cold for the waiters, say), or none: ``Yielded``. As ``load`` counts spare instances, so that
        a request is not sent a yielding window it cannot place (it would be sent again at once)."""
        waiting = [w.request for w in self._waiters if not w.future.done()]
        choices = [
            i for i in self._free()
            if self._may_run(i, request) and not any(self._may_run(i, other) for other in waiting)
        ]
        if not choices:
            raise Yielded("no idle instance for a yielding window")
        inst = self._best(choices, request)
        self._give(inst, request)
        return inst

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
        for inst in self.targets.all():
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
        if self._free():
            # The waiting critical windows may not use the free instances (cold for them): stopping
            # speculation elsewhere would not help them either (a warm one is taken over in acquire).
            return
        critical = sum(1 for w in self._waiters if w.priority[0] == 0 and not w.future.done())
        instances = [i for i in self.targets.all() if i.healthy and i.running is not None]
        running = [
            policy.RunningWindow(i.running.rank, i.running.window.request_seq, i.running.started,
                                 i.running.preempt.done(), i.reserved is not None, i.running.window.yields)
            for i in instances if i.running is not None
        ]
        for k in policy.preemption_victims(critical, running):
            running_window = instances[k].running
            assert running_window is not None
            running_window.preempt.set_result(None)

    def release(self, inst: TargetInstance) -> None:
        inst.busy = False
        if inst.removed:
            self.targets.close_channel(inst)
        reserved, inst.reserved = inst.reserved, None
        if reserved is not None and not reserved.done():
            if inst.healthy and not inst.removed:
                inst.busy = True
                reserved.set_result(inst)
            else:
                reserved.set_result(None)  # it went down: the critical window queues as usual
        self._hand_off()
