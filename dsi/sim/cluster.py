"""Several requests sharing a pool of target instances: a discrete-event simulator that runs the
orchestrator's own decision rules (``dsi.services.orchestrator.policy``: dispatch, credit, apply,
rank, queue order, preemption, spare targets), with no asyncio, grpc or models.

``dsi.sim.model`` is the paper's time model for one request (fast, vectorised, what the heatmaps and
automatic lookahead use). This one is the scheduler and the pool's placement as a second driver of
the same rules: each request runs non-SI, SI or DSI (``scheduler.py``), every window queues for one
of ``targets`` instances by ``policy.queue_key``, a waiting critical window preempts speculation by
``policy.preemption_victims``, and a request's speculation sees ``policy.spare_targets``.
``tests/unit/test_conformance.py`` runs the real ``Scheduler`` with the pool's real ``Placement`` on
a virtual clock against the same script and requires the same commits at the same times.

The script (all times in units of the target latency, or in seconds; any unit):

- a target forward takes ``target_latency`` whatever the window's length (or ``forward_time``'s
  value for it; a window that is preempted or cancelled frees its instance at once);
- each request has its own drafter, one draft every ``drafter_latency`` under the credit the rules
  grant, or all share one (``ClusterSettings.drafter``; the conformance test covers only the
  former);
- per epoch (per round in SI) the index K of its first rejected draft, counted from the epoch's
  first position: draft K is wrong, every earlier one right (``first_rejects``).

Events that fall within ``_TIE`` of each other are one instant, handled in the order an asyncio
event loop gives them: timers first (a finished window frees its instance, which goes to the head
of the queue), then each request's reaction (draft arrivals before finished windows), then the
windows it dispatched queue for instances, then preempted windows give theirs up and queue again.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from dsi.services.orchestrator import policy

__all__ = ["ClusterRequest", "ClusterSettings", "LoadPoint", "RequestOutcome", "load_sweep", "simulate_cluster"]

_TIE = 1e-9  # events closer than this are simultaneous (an asyncio loop's clock resolution)
_MODES = ("nonsi", "si", "dsi")


@dataclass(frozen=True)
class ClusterSettings:
    """The shared pool and the requests' common configuration.

    Attributes:
        targets: target instances (each runs one window at a time).
        target_latency: one forward, whatever the window's length.
        lookahead: L, drafts per window (SI and DSI).
        sp: SP degree, windows one DSI request may have in flight (0 = every instance).
        headroom: idle instances a request's speculation leaves to the others (the pool's default).
        forward_time: if set, the duration of each forward instead of ``target_latency``, from (the
            request's index in arrival order, the first position the window scores counted from the
            request's first generated token, the positions it scores).
        drafter: "own" (each request has a drafter of its own), or one drafter every request shares,
            one draft at a time, urgent drafts (``policy.urgent_until``) first, a background draft
            preempted when an urgent one comes (the drafter service's engine), and among drafts of
            one urgency: "shared-age" the oldest request's first (as the orchestrator asks of the
            drafter service), "shared-fifo" first come first served.
        yielding: short critical windows held back for other requests go out as yielding windows
            onto idle instances (``policy.yielding_window``; off: the orchestrator's
            --no-yielding-windows).
    """

    targets: int
    target_latency: float = 1.0
    lookahead: int = 4
    sp: int = 0
    headroom: int = 1
    forward_time: Callable[[int, int, int], float] | None = None
    drafter: str = "own"
    yielding: bool = True

    def __post_init__(self) -> None:
        if self.targets < 1 or self.lookahead < 1 or self.sp < 0 or self.headroom < 0:
            raise ValueError(f"invalid settings: {self}")
        if self.drafter not in ("own", "shared-age", "shared-fifo"):
            raise ValueError(f"drafter must be own, shared-age or shared-fifo, got {self.drafter!r}")
        if not (self.target_latency > 0 and math.isfinite(self.target_latency)):
            raise ValueError(f"target_latency must be a finite number > 0, got {self.target_latency!r}")


@dataclass(frozen=True)
class ClusterRequest:
    """One request: when it arrives, its mode, how many tokens it generates, its drafter's latency
    per draft, and the index of the first rejected draft of each epoch (SI: of each round); epochs
    past the list reject nothing."""

    arrival: float
    tokens: int
    mode: str = "dsi"
    drafter_latency: float = 0.1
    first_rejects: Sequence[int] = ()

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {self.mode!r}")
        if self.tokens < 1 or not self.drafter_latency > 0:
            raise ValueError(f"invalid request: {self}")


@dataclass
class RequestOutcome:
    """What one request did: when each token was committed, and its target work."""

    arrival: float
    commit_times: list[float] = field(default_factory=list)
    accepted: list[bool] = field(default_factory=list)  # per committed token: a draft the target accepted
    forwards: int = 0  # times a window got an instance (preempted windows count again)
    windows: int = 0
    preempted: int = 0
    cancelled: int = 0
    yielding: int = 0  # yielding windows dispatched (``policy.yielding_window``)
    dropped: int = 0  # of those, preempted, refused an instance or withdrawn (``windows_dropped``)
    epochs: int = 0
    # Instants at which an event of this request and one of another fell together (within _TIE):
    # their order is the event loop's, which asyncio leaves open; the simulator takes a fixed one.
    shared_instants: int = 0

    @property
    def finished(self) -> float:
        return self.commit_times[-1] if self.commit_times else self.arrival

    @property
    def latency(self) -> float:
        return self.finished - self.arrival


# -- the pool ----------------------------------------------------------------------------------


@dataclass(eq=False)
class _Window:
    req: _Request
    epoch: int
    start: int
    end: int
    rank: int
    first: int  # the first position it scores, counted from the request's first generated token
    yields: bool = False  # a yielding window (``policy.yielding_window``): dropped when preempted
    done: bool = False
    cancelled: bool = False
    waiting: bool = False
    running: _Run | None = None


@dataclass(eq=False)
class _Run:
    window: _Window
    rank: int
    started: float
    preempted: bool = False
    over: bool = False


class _Pool:
    """Instances (interchangeable: one latency, no affinity), the queue, preemption."""

    def __init__(self, sim: _Sim, settings: ClusterSettings) -> None:
        self.sim = sim
        self.latency = settings.target_latency
        self.forward_time = settings.forward_time
        self.headroom = settings.headroom
        self.free = settings.targets
        self.size = settings.targets
        self.running: list[_Run] = []
        self.waiters: list[tuple[tuple[int, int], _Window]] = []
        self.order = itertools.count()
        # Requests under way, from their first window until they finish (``Placement._active``, until
        # the scheduler's ``TargetClient.end``).
        self.under_way: set[int] = set()

    def load(self, req: _Request) -> policy.Load:
        """As ``Placement.load``: spare instances for the request, and the other requests under way."""
        others = {id(r.window.req) for r in self.running} | {id(w.req) for _, w in self.waiters}
        others.discard(id(req))
        quiet = not self.free or not others
        spare = policy.spare_targets(self.free, len(self.waiters), quiet, None, self.headroom)
        return policy.Load(spare, len((self.under_way | others) - {id(req)}))

    def acquire(self, window: _Window) -> None:
        self.under_way.add(id(window.req))
        if self.free and not self.waiters:
            self._start(window)
            return
        if window.yields:  # it takes only an instance idle now, or none
            self._drop(window, refused=True)
            return
        window.waiting = True
        heapq.heappush(self.waiters, (policy.queue_key(window.rank, next(self.order)), window))
        if window.rank == 0:
            self._preempt()

    def _start(self, window: _Window) -> None:
        self.free -= 1
        window.waiting = False
        run = _Run(window, window.rank, self.sim.now)
        window.running = run
        window.req.out.forwards += 1
        self.running.append(run)
        latency = self.latency
        if self.forward_time is not None:
            latency = self.forward_time(window.req.seq, window.first, window.end - window.start + 1)
        self.sim.timer(self.sim.now + latency, lambda: self._finished(run), window.req)

    def _release(self, run: _Run) -> None:
        run.over = True
        run.window.running = None
        self.running.remove(run)
        self.free += 1
        while self.free and self.waiters:
            _, window = heapq.heappop(self.waiters)
            self._start(window)

    def _finished(self, run: _Run) -> None:
        if run.over:
            return  # preempted or cancelled meanwhile
        self._release(run)
        run.window.done = True
        self.sim.deliver(run.window.req, lambda: run.window.req.window_finished(run.window), late=True)

    def cancel(self, window: _Window) -> None:
        window.cancelled = True
        if window.waiting:
            window.waiting = False
            self.waiters = [(k, w) for k, w in self.waiters if w is not window]
            heapq.heapify(self.waiters)
        elif window.running is not None:
            self._release(window.running)

    def reprioritize(self, window: _Window, rank: int) -> None:
        if rank >= window.rank:
            return
        window.rank = rank
        if window.running is not None:
            window.running.rank = min(rank, window.running.rank)
            return
        if window.waiting:
            self.waiters = [((rank, *k[1:]) if w is window else k, w) for k, w in self.waiters]  # type: ignore[misc]
            heapq.heapify(self.waiters)
            if rank == 0:
                self._preempt()

    def _preempt(self) -> None:
        critical = sum(1 for k, _ in self.waiters if k[0] == 0)
        views = [policy.RunningWindow(r.rank, r.window.req.seq, r.started, r.preempted, yields=r.window.yields)
                 for r in self.running]
        for i in policy.preemption_victims(critical, views):
            victim = self.running[i]
            victim.preempted = True
            self.sim.after_acquires(functools.partial(self._yield, victim))

    def _yield(self, run: _Run) -> None:
        """A preempted window gives its instance up (to the queue's head) and queues again; a
        yielding one is dropped."""
        if run.over:
            return
        run.window.req.out.preempted += 1
        self._release(run)
        if run.window.yields:
            self._drop(run.window, refused=False)
        else:
            self.acquire(run.window)

    def _drop(self, window: _Window, refused: bool) -> None:
        window.cancelled = True
        self.sim.deliver(window.req, lambda: window.req.window_dropped(window, refused), late=True)


# -- the requests -----------------------------------------------------------------------------


class _Stream:
    """A request's draft stream under credit: one draft every ``latency`` while it has credit."""

    def __init__(self, sim: _Sim, req: _Request, credit: int, on_draft: Callable[[_Stream], None]) -> None:
        self.sim, self.req, self.credit, self.on_draft = sim, req, credit, on_draft
        self.cancelled = False
        req.k = req.next_reject()  # the script: one first-rejection index per stream opened
        self.pending = False
        self.made = 0  # drafts this stream has made (its next draft has this index in the epoch)
        self._next()

    def _next(self) -> None:
        if self.credit > 0 and not self.pending and not self.cancelled:
            self.pending = True
            if self.sim.drafter is not None:
                self.sim.drafter.submit(self)
            else:
                self.sim.timer(self.sim.now + self.req.spec.drafter_latency, self.arrive, self.req)

    def urgent(self) -> bool:
        """The next draft is one the request's critical window needs (SI: every draft)."""
        return self.req.urgent_until is None or self.made < self.req.urgent_until

    def arrive(self) -> None:
        self.pending = False
        if self.cancelled:
            return
        self.credit -= 1
        self.made += 1
        self.sim.deliver(self.req, lambda: self.on_draft(self), late=False)
        self._next()

    def grant(self, n: int) -> None:
        self.credit += n
        self._next()

    def cancel(self) -> None:
        self.cancelled = True
        if self.sim.drafter is not None:
            self.sim.drafter.drop(self)


@dataclass(eq=False)
class _Step:
    stream: _Stream
    order: int
    over: bool = False


class _SharedDrafter:
    """One drafter for every request: a draft at a time, urgent first, background preempted."""

    def __init__(self, sim: _Sim, fifo: bool) -> None:
        self.sim, self.fifo = sim, fifo
        self.queue: list[_Step] = []
        self.running: _Step | None = None
        self.order = itertools.count()

    def _priority(self, step: _Step) -> tuple[int, int]:
        return (0 if step.stream.urgent() else 1, step.order if self.fifo else step.stream.req.seq)

    def submit(self, stream: _Stream) -> None:
        step = _Step(stream, next(self.order))
        self.queue.append(step)
        running = self.running
        if running is not None and not running.stream.urgent() and stream.urgent():
            running.over = True  # preempted: it runs again later, from the start
            self.queue.append(_Step(running.stream, next(self.order)))
            self.running = None
        self._kick()

    def drop(self, stream: _Stream) -> None:
        self.queue = [s for s in self.queue if s.stream is not stream]
        if self.running is not None and self.running.stream is stream:
            self.running.over = True
            self.running = None
            self._kick()

    def _kick(self) -> None:
        if self.running is not None or not self.queue:
            return
        step = min(self.queue, key=lambda s: (self._priority(s), s.order))
        self.queue.remove(step)
        self.running = step
        self.sim.timer(self.sim.now + step.stream.req.spec.drafter_latency, lambda: self._done(step), step.stream.req)

    def _done(self, step: _Step) -> None:
        if step.over:
            return
        self.running = None
        step.stream.arrive()
        self._kick()


class _Request:
    """One request run by the scheduler's rules (``Scheduler._run_nonsi``, ``_run_si``, ``_run_epoch``)."""

    def __init__(self, sim: _Sim, seq: int, spec: ClusterRequest, settings: ClusterSettings) -> None:
        self.sim, self.seq, self.spec, self.cfg = sim, seq, spec, settings
        self.out = RequestOutcome(arrival=spec.arrival)
        self.rejects = iter(spec.first_rejects)
        self.epoch = 0
        # The current epoch (DSI) or round (SI).
        self.base = 0
        self.k = 0
        self.drafts = 0
        self.windows: list[_Window] = []
        self.applied = 0
        self.decided = 0
        self.requested = 0
        self.stream: _Stream | None = None
        self.urgent_until: int | None = None  # drafts of the epoch below this are urgent (None: all)
        self.hold_yielding = False  # a yielding window was refused an instance (``_Epoch.hold_yielding``)

    # -- shared pieces (as in ``Scheduler``) --------------------------------------------------------

    @property
    def pool(self) -> _Pool:
        return self.sim.pool

    def remaining(self) -> int:
        return self.spec.tokens - len(self.out.commit_times)

    def done(self) -> bool:
        return self.remaining() <= 0

    def sp(self) -> int:
        return min(self.pool.size, self.cfg.sp) if self.cfg.sp > 0 else self.pool.size

    def next_reject(self) -> int:
        return next(self.rejects, 1 << 62)

    def _commit(self, decision: policy.Decision) -> bool:
        self.out.commit_times.append(self.sim.now)
        self.out.accepted.append(decision is policy.Decision.ACCEPT)
        return self.done()

    def _apply(self, window: _Window) -> policy.EpochEnd | None:
        self.decided, end = policy.apply_window(
            window.start, window.end, self.decided, self.drafts, lambda i: i != self.k,
            lambda i, decision: self._commit(decision),
        )
        return end

    def _dispatch(self, start: int, end: int, rank: int, yields: bool = False) -> _Window:
        window = _Window(self, self.epoch, start, end, rank, self.base + start, yields)
        self.windows.append(window)
        self.out.windows += 1
        self.sim.acquire_later(window)
        return window

    # -- start ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._round()

    def _round(self) -> None:
        """Start the next round (non-SI, SI) or epoch (DSI), unless done."""
        self.epoch += 1  # what is still pending of the last epoch is stale from here on
        if self.done():
            self.sim.finished += 1
            self.sim.pool.under_way.discard(id(self))
            return
        self.out.epochs += 1
        self.base = len(self.out.commit_times)
        self.drafts = self.applied = self.decided = self.requested = 0
        self.windows = []
        self.stream = None
        self.urgent_until = None
        self.hold_yielding = False
        mode = self.spec.mode
        if mode == "nonsi":
            self._dispatch(0, 0, 0)
        elif mode == "si":
            count = min(self.cfg.lookahead, policy.draft_room(self.remaining(), 0, 0, self.base))
            if count > 0:
                self.requested = count
                self.stream = _Stream(self.sim, self, count, self._si_draft)
            else:
                self._dispatch(0, 0, 0)
        else:
            sp = self.sp()
            self._dispatch_ready(sp)
            self._open_drafter(sp)

    # -- SI ---------------------------------------------------------------------------------------

    def _si_draft(self, stream: _Stream) -> None:
        if stream is not self.stream:
            return
        self.drafts += 1
        if self.drafts == self.requested:
            assert self.stream is not None
            self.stream.cancel()
            self._dispatch(0, self.drafts, 0)

    # -- DSI --------------------------------------------------------------------------------------

    def _state(self) -> policy.EpochState:
        critical = self.windows[self.applied] if self.applied < len(self.windows) else None
        room = policy.draft_room(self.remaining(), self.decided, self.requested, self.base)
        return policy.EpochState(
            drafts=self.drafts,
            decided=self.decided,
            dispatched_end=self.windows[-1].end if self.windows else 0,
            windows=len(self.windows),
            applied=self.applied,
            in_flight=sum(1 for w in self.windows[self.applied :] if not (w.done or w.cancelled)),
            budget=self.decided + self.remaining() - 1,
            more_drafts=self.drafts < self.requested or room > 0,
            critical_start=critical.start if critical else 0,
            critical_end=critical.end if critical else 0,
        )

    def _dispatch_ready(self, sp: int) -> None:
        # The load is read with a withdrawn window's instance still busy, as the scheduler reads it
        # (its cancel frees the instance after the dispatch).
        load = self.pool.load(self)
        state = self._state()
        critical = self.windows[self.applied] if self.applied < len(self.windows) else None
        if critical is not None and critical.yields and policy.withdraw_yielding(state, self.cfg.lookahead):
            self.windows.pop()  # the only window in flight: its full window goes out instead, at once
            self.out.dropped += 1
            self.sim.cancel(critical)
            state = self._state()
        windows = policy.windows_to_dispatch(state, self.cfg.lookahead, sp, load)
        for start, end in windows:
            self._dispatch(start, end, policy.window_rank(len(self.windows), self.applied))
        yielding = None
        if self.cfg.yielding and not windows and not self.hold_yielding:
            yielding = policy.yielding_window(state, self.cfg.lookahead, load)
        if yielding is not None:
            self.out.yielding += 1
            self._dispatch(*yielding, policy.window_rank(len(self.windows), self.applied), yields=True)
        self.urgent_until = policy.urgent_until(self._state(), self.cfg.lookahead)

    def _open_drafter(self, sp: int) -> None:
        if self.done():
            return
        room = policy.draft_credit(self.requested, self.decided, self.cfg.lookahead, sp,
                                   policy.draft_room(self.remaining(), self.decided, self.requested, self.base))
        if room <= 0:
            return
        self.requested += room
        if self.stream is not None:
            self.stream.grant(room)
        else:
            self.stream = _Stream(self.sim, self, room, self._dsi_draft)

    def _dsi_draft(self, stream: _Stream) -> None:
        if stream is not self.stream or stream.cancelled:
            return  # a draft of an epoch that has ended
        self.drafts += 1
        self.hold_yielding = False
        self._dsi_event()

    # -- a window finished ------------------------------------------------------------------------

    def window_finished(self, window: _Window) -> None:
        if window.epoch != self.epoch:
            return  # its epoch ended before it was applied
        if self.spec.mode != "dsi":
            self.applied += 1
            self._apply(window)
            self._round()
            return
        if not window.yields:
            self.hold_yielding = False
        self._dsi_event()

    def window_dropped(self, window: _Window, refused: bool) -> None:
        """A yielding window was preempted or found no idle instance: the request goes on without it."""
        if window.epoch != self.epoch or window not in self.windows:
            return
        self.windows.remove(window)
        self.out.dropped += 1
        self.hold_yielding = refused
        self._dsi_event()

    def _dsi_event(self) -> None:
        """After any event: apply every finished window in order, then dispatch and grant."""
        end = None
        applied = self.applied
        while self.applied < len(self.windows) and self.windows[self.applied].done:
            w = self.windows[self.applied]
            self.applied += 1
            end = self._apply(w)
            if end is not None:
                break
        if end is not None:
            self._close_epoch()
            self._round()
            return
        if self.applied > applied:
            for index in range(self.applied, len(self.windows)):
                w = self.windows[index]
                if not w.done:
                    self.pool.reprioritize(w, policy.window_rank(index, self.applied))
        sp = self.sp()
        self._dispatch_ready(sp)
        self._open_drafter(sp)

    def _close_epoch(self) -> None:
        if self.stream is not None:
            self.stream.cancel()
        # As task cancels do: windows still queued leave the queue at once, running ones then free
        # their instances (which go to the queue's head), in window order.
        left = [w for w in self.windows[self.applied :] if not w.done]
        self.out.cancelled += len(left)
        for w in sorted(left, key=lambda w: w.running is not None):
            self.sim.cancel(w)


# -- the event loop ---------------------------------------------------------------------------


class _Sim:
    def __init__(self, settings: ClusterSettings) -> None:
        self.now = 0.0
        self.pool = _Pool(self, settings)
        self.drafter = None if settings.drafter == "own" else _SharedDrafter(self, settings.drafter == "shared-fifo")
        self.finished = 0
        self._timers: list[tuple[float, int, Callable[[], None], _Request]] = []
        self._seq = itertools.count()
        self._early: list[Callable[[], None]] = []  # draft arrivals and request starts of this instant
        self._late: list[Callable[[], None]] = []  # finished windows of this instant
        self._acquires: list[_Window] = []
        self._yields: list[Callable[[], None]] = []

    def timer(self, when: float, fn: Callable[[], None], req: _Request) -> None:
        heapq.heappush(self._timers, (when, next(self._seq), fn, req))

    def deliver(self, req: _Request, fn: Callable[[], None], late: bool) -> None:
        (self._late if late else self._early).append(fn)

    def acquire_later(self, window: _Window) -> None:
        self._acquires.append(window)

    def after_acquires(self, fn: Callable[[], None]) -> None:
        self._yields.append(fn)

    def cancel(self, window: _Window) -> None:
        if window in self._acquires:
            self._acquires.remove(window)  # dispatched this instant, never started: nothing to undo
            window.cancelled = True
            return
        self.pool.cancel(window)

    def run(self, requests: list[_Request]) -> None:
        for req in requests:
            self.timer(req.spec.arrival, functools.partial(self.deliver, req, req.start, False), req)
        while self._timers:
            first = self._timers[0][0]
            self.now = first  # one instant: every timer within _TIE of the first
            owners: set[_Request] = set()
            while self._timers and self._timers[0][0] < first + _TIE:
                _, _, fn, owner = heapq.heappop(self._timers)
                owners.add(owner)
                fn()
            if len(owners) > 1:
                for owner in owners:
                    owner.out.shared_instants += 1
            while self._early or self._late or self._acquires or self._yields:
                while self._early or self._late:
                    (self._early if self._early else self._late).pop(0)()
                while self._acquires:
                    window = self._acquires.pop(0)
                    if not window.cancelled:
                        self.pool.acquire(window)
                while self._yields:
                    self._yields.pop(0)()
        if self.finished != len(requests):
            raise RuntimeError(f"simulation stalled: {self.finished} of {len(requests)} requests finished")


def simulate_cluster(settings: ClusterSettings, requests: Iterable[ClusterRequest]) -> list[RequestOutcome]:
    """Run the requests (in arrival order, which is also their age for the queue) on the pool;
    their outcomes, in the order given."""
    specs = list(requests)
    order = sorted(range(len(specs)), key=lambda i: (specs[i].arrival, i))
    sim = _Sim(settings)
    reqs: list[_Request | None] = [None] * len(specs)
    for seq, i in enumerate(order):
        reqs[i] = _Request(sim, seq, specs[i], settings)
    runs = [r for r in reqs if r is not None]
    sim.run(runs)
    return [r.out for r in runs]


# -- a load sweep (``dsi simulate load``) --------------------------------------------------------


@dataclass(frozen=True)
class LoadPoint:
    """Medians over runs for one mode at one concurrency: committed tokens per unit of time (all
    requests' tokens / the time the last one finished), median and p99 request latency, target
    forwards per committed token."""

    acceptance: float
    concurrency: int
    mode: str
    tokens_per_time: float
    p50_latency: float
    p99_latency: float
    forwards_per_token: float


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def load_sweep(
    settings: ClusterSettings,
    acceptances: Sequence[float],
    concurrencies: Sequence[int],
    drafter_latency: float,
    tokens: int,
    runs: int,
    seed: int = 0,
    progress: Callable[[], None] | None = None,
) -> list[LoadPoint]:
    """C requests sent at once (each a hair after the previous, in order) per concurrency level, in
    every mode, ``runs`` times with i.i.d. first rejections (the same draws in every mode of a run)."""
    import numpy as np  # the simulator's only dependency besides the rules

    points: list[LoadPoint] = []
    for a in acceptances:
        for conc in concurrencies:
            per_mode: dict[str, list[tuple[float, float, float, float]]] = {m: [] for m in _MODES}
            for run in range(runs):
                rng = np.random.default_rng([seed, run, conc, int(round(a * 1e6))])
                draws = (
                    [[1 << 62] * tokens for _ in range(conc)] if a >= 1.0
                    else [list(rng.geometric(1.0 - a, size=tokens + 1) - 1) for _ in range(conc)]
                )
                for mode in _MODES:
                    specs = [ClusterRequest(i * 1e-6, tokens, mode, drafter_latency, draws[i]) for i in range(conc)]
                    out = simulate_cluster(settings, specs)
                    committed = sum(len(o.commit_times) for o in out)
                    latencies = [o.latency for o in out]
                    per_mode[mode].append((
                        committed / max(o.finished for o in out),
                        _percentile(latencies, 0.5),
                        _percentile(latencies, 0.99),
                        sum(o.forwards for o in out) / committed,
                    ))
                    if progress is not None:
                        progress()
            for mode, rows in per_mode.items():
                med = [sorted(col)[len(col) // 2] for col in zip(*rows, strict=True)]
                points.append(LoadPoint(a, conc, mode, *med))
    return points
