"""The DSI scheduler (Timor et al., ICLR 2025; docs/architecture.md) and the SI and non-SI baselines.

Pure asyncio: no torch, no grpc. It talks to a ``TargetClient`` (verifies windows, possibly on
several target instances at once) and a ``DrafterClient`` (streams drafts), so unit tests run it
against in-memory fakes on a virtual clock.

Terms: the *committed* sequence (prompt + tokens decided so far); *drafts* D[0], D[1], ... proposed
after the committed prefix of the current *epoch*; a *window* verifies drafts D[s:e) and returns
the target's token at positions base+s .. base+e (the last one is the *bonus* position); the
*lookahead* L is the number of drafts per window; the *SP degree* is how many windows may be in
flight at once.

DSI, one epoch (everything launched from one committed prefix, at position ``base``):
  1. open the drafter stream and, when a target would otherwise idle, dispatch window 0 (no
     drafts: the target's next token, i.e. the non-SI step) at once;
  2. every L new drafts, while fewer than SP windows are in flight, dispatch a window over them;
     if no window is computing the first undecided position (the critical path is idle), dispatch
     one over the drafts there are; the drafter runs at most (SP + 1) x L drafts ahead. Under load
     the rules in ``policy.py`` decide: speculative windows, short windows and window 0 only use
     target capacity nobody else needs (held back for other requests, a short critical window goes
     onto an idle instance as a *yielding* window, dropped when a critical window needs the
     instance, withdrawn when its full window can go), and drafts beyond the critical window are
     background work;
  3. apply results strictly in window order; per position: the target's token equals the draft ->
     commit the draft; else commit the target's token, cancel every in-flight window and the drafter
     stream, and start a new epoch (a *rejection*). At the bonus position with no draft yet, commit
     the target's token and start a new epoch from there (a *resync*).
Every position is decided exactly once, by the target's choice given the committed prefix, so the
output is the target's (lossless); drafts only decide what is computed ahead.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from dsi.services.orchestrator import policy
from dsi.services.orchestrator.policy import EpochEnd
from dsi.services.runtime.params import Mode

log = logging.getLogger(__name__)


# -- the contract with the transport ------------------------------------------------------------


@dataclass(frozen=True)
class Draft:
    """A draft token; ``probs`` is the drafter's distribution (rejection sampling only)."""

    token_id: int
    probs: tuple[list[int], list[float]] | None = None


@dataclass
class WindowTiming:
    """Filled in by the target client as the window runs: seconds waiting for a free target
    instance, seconds holding one (the call itself), how many times it got one (retries and
    preemptions count) and how many times a critical window preempted it."""

    queued_s: float = 0.0
    held_s: float = 0.0
    acquired: int = 0
    preempted: int = 0
    retries: int = 0  # times it failed on an instance and was sent to another


@dataclass(frozen=True)
class WindowRequest:
    """Verify drafts token_ids[first_position:] given token_ids[:first_position]."""

    session_id: str
    token_ids: list[int]
    first_position: int
    # 0 = the window on the request's critical path; speculative windows have higher ranks.
    rank: int
    # Arrival order of the request (preemption stops the newest request's speculation first).
    request_seq: int
    draft_probs: list[tuple[list[int], list[float]]] | None = None
    timing: WindowTiming = field(default_factory=WindowTiming, compare=False)
    # token_ids[:committed] are committed: every later window of the request starts with them (the
    # target client relies on it to tell what an instance already holds without comparing them).
    committed: int = 0
    # A yielding window (``policy.yielding_window``): it takes only an instance idle now, and a
    # critical window that has to wait preempts it first; either way it fails with ``Yielded``.
    yields: bool = False


class Yielded(Exception):
    """A yielding window found no idle instance, or gave its instance up to a critical window: it is
    dropped (the request goes on without it)."""


@dataclass(frozen=True)
class WindowResult:
    """The target's token at positions first_position .. len(token_ids), and who computed them."""

    token_ids: list[int]
    target: str
    compute_s: float
    retries: int = 0


class TargetClient(Protocol):
    def sp_limit(self) -> int:
        """How many windows may run at once (healthy target instances)."""
        ...

    def load(self) -> policy.Load:
        """Target instances idle now that no waiting window will take (capacity nobody needs), and
        the other requests under way (``policy.Load``)."""
        ...

    async def verify(self, window: WindowRequest) -> WindowResult:
        """Verify one window. Cancelling the awaiting task must cancel the remote work."""
        ...

    def reprioritize(self, window: WindowRequest, rank: int) -> None:
        """The window, dispatched with ``window.rank``, now has this rank (lower: it moved up the
        request's order, rank 0 being its critical path); a window still waiting for a target
        takes its new place in the queue."""
        ...

    def end(self) -> None:
        """The request is over and its windows are cancelled: the other requests no longer count it
        as under way (``policy.Load.others``)."""
        ...


class DraftStream(Protocol):
    """Drafts under credit: the stream may send as many drafts as it was opened with plus granted."""

    def __aiter__(self) -> AsyncIterator[Draft]: ...

    def grant(self, n: int) -> None:
        """Allow n more drafts (the stream waits, idle, while it has no credit)."""
        ...

    def end_grants(self) -> None:
        """No more grants: the stream ends once its credit is used."""
        ...

    def set_urgent(self, until: int) -> None:
        """Drafts that make the sequence at most ``until`` tokens long are urgent; later ones are
        background work the drafter does only when no stream has urgent drafts to make."""
        ...

    def cancel(self) -> None:
        """Stop the stream (a real cancel of the remote call)."""
        ...


class DrafterClient(Protocol):
    def open(self, session_id: str, prefix: list[int], max_tokens: int, return_probs: bool) -> DraftStream:
        """Start streaming drafts continuing prefix, max_tokens of them before the next grant."""
        ...


# -- requests, commits and stats ----------------------------------------------------------------


class Source(enum.Enum):
    DRAFT = "draft"  # a draft the target accepted
    TARGET = "target"  # the target's own token


@dataclass(frozen=True)
class CommittedToken:
    token_id: int
    position: int
    source: Source
    target: str


@dataclass(frozen=True)
class SchedulerConfig:
    mode: Mode
    lookahead: int = 5
    sp_degree: int = 0  # 0 = as many as the target client allows
    max_new_tokens: int = 64
    rejection: bool = False  # drafter ships its distributions with each draft
    # Most tokens (prefix + drafts) the drafter can hold; no draft is asked beyond it (0 = no limit).
    draft_sequence_length: int = 0
    # Short critical windows held back for other requests go out as yielding windows on idle targets.
    yielding: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode(self.mode))  # "dsi" is accepted and becomes Mode.DSI


@dataclass
class RequestStats:
    mode: Mode = Mode.DSI
    windows_dispatched: int = 0
    windows_applied: int = 0
    windows_cancelled: int = 0
    drafts_proposed: int = 0
    drafts_verified: int = 0
    drafts_accepted: int = 0
    epochs: int = 0
    max_windows_in_flight: int = 0
    wasted_target_s: float = 0.0
    target_forwards: int = 0
    critical_queue_wait_s: float = 0.0
    windows_preempted: int = 0
    windows_yielding: int = 0  # yielding windows dispatched (``policy.yielding_window``)
    windows_dropped: int = 0  # of those, dropped (preempted, or no idle instance) or withdrawn
    retries: int = 0
    drafter_failed: bool = False
    tokens_from_drafts: int = 0
    new_tokens: int = 0
    ttft_s: float = 0.0
    wall_s: float = 0.0
    sp_degree: int = 0
    lookahead: int = 0
    auto_tuned: bool = False  # lookahead / SP degree chosen from measurements (server 'auto')

    @property
    def acceptance_rate(self) -> float:
        return self.drafts_accepted / self.drafts_verified if self.drafts_verified else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0


# on_commit(token) -> True to stop generating (EOS, stop string); called once per committed token.
CommitCallback = Callable[[CommittedToken], bool]


@dataclass
class _Window:
    start: int  # first draft index (relative to the epoch base)
    end: int  # one past the last draft index; the bonus position is base + end
    task: asyncio.Task[WindowResult]
    request: WindowRequest
    result: WindowResult | None = None


@dataclass(frozen=True)
class _DraftArrived:
    draft: Draft


@dataclass(frozen=True)
class _DraftStreamEnded:
    stream: DraftStream


@dataclass(frozen=True)
class _WindowFinished:
    window: _Window


# What wakes an epoch up, in arrival order.
_EpochEvent = _DraftArrived | _DraftStreamEnded | _WindowFinished


@dataclass
class _Epoch:
    base: int
    drafts: list[Draft] = field(default_factory=list)
    windows: list[_Window] = field(default_factory=list)
    # Yielding windows dropped or withdrawn (no longer in ``windows``): awaited and accounted at the end.
    dropped: list[_Window] = field(default_factory=list)
    applied: int = 0  # windows applied, in order
    # A yielding window found no idle instance: none is sent again until another event (a draft, a
    # window's end) may have changed that, so that a request never loops sending and dropping one.
    hold_yielding: bool = False
    decided: int = 0  # positions decided in this epoch (the committed sequence is base + decided long)
    stream: DraftStream | None = None
    reader: asyncio.Task[None] | None = None
    requested: int = 0  # drafts asked of the drafter in this epoch (received + credit outstanding)
    # Draft arrivals, drafter stream ends and window completions of this epoch, in arrival order.
    events: asyncio.Queue[_EpochEvent] = field(default_factory=asyncio.Queue)

    @property
    def dispatched_end(self) -> int:
        return self.windows[-1].end if self.windows else 0

    def in_flight(self) -> list[_Window]:
        return [w for w in self.windows[self.applied :] if not w.task.done()]


class Scheduler:
    """Runs one request in one of the three modes; streams commits through ``on_commit``."""

    def __init__(
        self,
        target: TargetClient,
        drafter: DrafterClient | None,
        config: SchedulerConfig,
        session_id: str,
        request_seq: int = 0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.target = target
        self.drafter = drafter
        self.cfg = config
        self.session_id = session_id
        self.request_seq = request_seq
        self.clock = clock
        self.stats = RequestStats(mode=config.mode, lookahead=config.lookahead)
        self.seq: list[int] = []
        self.generated: list[CommittedToken] = []
        self._on_commit: CommitCallback = lambda t: False
        self._stopped = False
        self._t0 = 0.0

    # -- public ----------------------------------------------------------------------------------

    async def run(self, prompt: list[int], on_commit: CommitCallback) -> RequestStats:
        if not prompt:
            raise ValueError("prompt must not be empty")
        self.seq = list(prompt)
        self._on_commit = on_commit
        self._t0 = self.clock()
        self.stats.sp_degree = self._sp()
        try:
            if self.cfg.mode is Mode.NONSI or (self.drafter is None and self.cfg.mode is Mode.SI):
                await self._run_nonsi()
            elif self.cfg.mode is Mode.SI:
                await self._run_si()
            else:
                while not self._done():
                    await self._run_epoch()
        finally:
            self.stats.wall_s = self.clock() - self._t0
            self.target.end()
        return self.stats

    # -- shared pieces ---------------------------------------------------------------------------

    def _sp(self) -> int:
        limit = max(1, self.target.sp_limit())
        return min(limit, self.cfg.sp_degree) if self.cfg.sp_degree > 0 else limit

    def _remaining(self) -> int:
        return self.cfg.max_new_tokens - len(self.generated)

    def _done(self) -> bool:
        return self._stopped or self._remaining() <= 0

    def _draft_room(self, base: int, decided: int, requested: int) -> int:
        return policy.draft_room(self._remaining(), decided, requested, base, self.cfg.draft_sequence_length)

    def _commit(self, token_id: int, source: Source, target: str) -> None:
        token = CommittedToken(token_id, len(self.seq), source, target)
        self.seq.append(token_id)
        self.generated.append(token)
        self.stats.new_tokens += 1
        if source is Source.DRAFT:
            self.stats.tokens_from_drafts += 1
        if len(self.generated) == 1:
            self.stats.ttft_s = self.clock() - self._t0
        if self._on_commit(token):
            self._stopped = True

    def _apply(
        self, drafts: list[Draft], decided: int, start: int, result: WindowResult
    ) -> tuple[int, EpochEnd | None]:
        """Apply a window's result (drafts[start:end], bonus at end) by the rules' ``apply_window``.

        Returns the new number of decided positions and how the epoch ends (None: it goes on).
        """

        def commit(i: int, decision: policy.Decision) -> bool:
            tok = result.token_ids[i - start]
            if decision is not policy.Decision.BONUS:
                self.stats.drafts_verified += 1
            if decision is policy.Decision.ACCEPT:
                self.stats.drafts_accepted += 1
            self._commit(tok, Source.DRAFT if decision is policy.Decision.ACCEPT else Source.TARGET, result.target)
            return self._done()

        end = start + len(result.token_ids) - 1
        return policy.apply_window(
            start, end, decided, len(drafts), lambda i: drafts[i].token_id == result.token_ids[i - start], commit
        )

    def _account(self, window: WindowRequest) -> None:
        """Target cost of a finished window (completed, failed or cancelled)."""
        self.stats.target_forwards += window.timing.acquired
        self.stats.windows_preempted += window.timing.preempted
        self.stats.retries += window.timing.retries  # also of windows cancelled or never applied
        if window.rank == 0:
            self.stats.critical_queue_wait_s += window.timing.queued_s

    def _window_request(
        self, base: int, drafts: list[Draft], start: int, end: int, rank: int, yields: bool = False
    ) -> WindowRequest:
        probs = None
        if self.cfg.rejection:
            probs = [d.probs or ([], []) for d in drafts[start:end]]
        return WindowRequest(
            session_id=self.session_id,
            token_ids=self.seq[:base] + [d.token_id for d in drafts[:end]],
            first_position=base + start,
            rank=rank,
            request_seq=self.request_seq,
            draft_probs=probs,
            committed=base,
            yields=yields,
        )

    # -- non-SI and SI baselines ----------------------------------------------------------------

    async def _run_nonsi(self) -> None:
        while not self._done():
            base = len(self.seq)
            self.stats.epochs += 1
            self.stats.windows_dispatched += 1
            self.stats.max_windows_in_flight = max(self.stats.max_windows_in_flight, 1)
            request = self._window_request(base, [], 0, 0, 0)
            try:
                result = await self.target.verify(request)
            finally:
                self._account(request)
            self.stats.windows_applied += 1
            self._apply([], 0, 0, result)

    async def _collect_drafts(self, base: int, count: int) -> list[Draft]:
        assert self.drafter is not None
        stream = self.drafter.open(self.session_id, list(self.seq), count, self.cfg.rejection)
        stream.end_grants()
        drafts: list[Draft] = []
        try:
            async for d in stream:
                drafts.append(d)
                if len(drafts) >= count:
                    break
        except asyncio.CancelledError:
            stream.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - the drafter may die; continue target-only
            log.warning("session %s: drafter failed (%s); continuing target-only", self.session_id, exc)
            self.stats.drafter_failed = True
            self.drafter = None
        finally:
            stream.cancel()
        self.stats.drafts_proposed += len(drafts)
        return drafts

    async def _run_si(self) -> None:
        while not self._done():
            base = len(self.seq)
            self.stats.epochs += 1
            count = min(self.cfg.lookahead, self._draft_room(base, 0, 0))
            drafts = await self._collect_drafts(base, count) if self.drafter is not None and count > 0 else []
            self.stats.windows_dispatched += 1
            self.stats.max_windows_in_flight = max(self.stats.max_windows_in_flight, 1)
            request = self._window_request(base, drafts, 0, len(drafts), 0)
            try:
                result = await self.target.verify(request)
            finally:
                self._account(request)
            self.stats.windows_applied += 1
            self._apply(drafts, 0, 0, result)

    # -- DSI --------------------------------------------------------------------------------------

    async def _run_epoch(self) -> None:
        ep = _Epoch(base=len(self.seq))
        self.stats.epochs += 1
        sp = self._sp()
        self.stats.sp_degree = max(self.stats.sp_degree, sp)
        try:
            # Window 0, the non-SI step, goes out at once when a target would otherwise idle.
            self._dispatch_ready(ep, sp)
            self._open_drafter(ep, sp)
            while True:
                event = await ep.events.get()
                if not (isinstance(event, _WindowFinished) and event.window.request.yields):
                    ep.hold_yielding = False
                if isinstance(event, _DraftStreamEnded):
                    if event.stream is not ep.stream:
                        continue
                    # Ended early (deadline, or the drafter failed): no more drafts on it. Reopen, or
                    # with no drafter left dispatch what there is (below): nothing else may be pending.
                    ep.stream = None
                    ep.requested = len(ep.drafts)
                # Whatever the event, every window whose call has finished is applied before anything
                # is dispatched (a draft handled after a window's call ended sees its result), as the
                # simulators do.
                if self._collect_results(ep):
                    end = self._apply_ready(ep)
                    if end is not None:
                        return
                self._drop_if_yielded(ep)
                self._raise_if_critical_failed(ep)
                sp = self._sp()
                self._dispatch_ready(ep, sp)
                self._open_drafter(ep, sp)
        finally:
            await self._close_epoch(ep)

    @staticmethod
    def _collect_results(ep: _Epoch) -> bool:
        """Take the results of the windows whose calls have finished; True when there were new ones.
        A failed window is left for ``_raise_if_critical_failed``: windows before it may end the
        epoch first, and then its failure does not matter."""
        new = False
        for window in ep.windows[ep.applied :]:
            task = window.task
            if window.result is None and task.done() and not task.cancelled() and task.exception() is None:
                window.result = task.result()
                new = True
        return new

    @staticmethod
    def _raise_if_critical_failed(ep: _Epoch) -> None:
        """The request's critical window (every window before it applied) failed: that is the
        request's failure (the pool has already retried it elsewhere)."""
        if ep.applied < len(ep.windows):
            task = ep.windows[ep.applied].task
            exc = task.exception() if task.done() and not task.cancelled() else None
            if exc is not None:
                raise exc

    def _drop_if_yielded(self, ep: _Epoch) -> None:
        """The request's yielding window (its only one in flight) failed with ``Yielded``: drop it."""
        if ep.applied < len(ep.windows) and ep.windows[-1].request.yields:
            task = ep.windows[-1].task
            if task.done() and not task.cancelled() and isinstance(task.exception(), Yielded):
                ep.hold_yielding = ep.windows[-1].request.timing.acquired == 0  # refused, not preempted
                self._drop_yielding(ep)

    def _drop_yielding(self, ep: _Epoch) -> None:
        """Take the yielding window out of the epoch (cancelled if it still runs): nothing was
        dispatched after it, so its positions are simply undecided again."""
        window = ep.windows.pop()
        if not window.task.done():
            window.task.cancel()
        ep.dropped.append(window)
        self.stats.windows_dropped += 1

    def _apply_ready(self, ep: _Epoch) -> EpochEnd | None:
        applied = ep.applied
        while ep.applied < len(ep.windows) and ep.windows[ep.applied].result is not None:
            window = ep.windows[ep.applied]
            assert window.result is not None
            ep.applied += 1
            self.stats.windows_applied += 1
            ep.decided, end = self._apply(ep.drafts, ep.decided, window.start, window.result)
            if end is not None:
                return end
        if ep.applied > applied:
            # The windows after the applied ones moved up the request's order; the first of them is
            # now its critical path, and must not keep waiting behind other requests' speculation.
            for index in range(ep.applied, len(ep.windows)):
                if not ep.windows[index].task.done():
                    self.target.reprioritize(ep.windows[index].request, policy.window_rank(index, ep.applied))
        return None

    def _dispatch(self, ep: _Epoch, start: int, end: int, yields: bool = False) -> None:
        rank = policy.window_rank(len(ep.windows), ep.applied)
        request = self._window_request(ep.base, ep.drafts, start, end, rank, yields)
        task = asyncio.create_task(self.target.verify(request))
        window = _Window(start, end, task, request)
        task.add_done_callback(functools.partial(self._window_done, ep, window))
        ep.windows.append(window)
        self.stats.windows_dispatched += 1
        self.stats.max_windows_in_flight = max(self.stats.max_windows_in_flight, len(ep.in_flight()))

    @staticmethod
    def _window_done(ep: _Epoch, window: _Window, _task: object) -> None:
        ep.events.put_nowait(_WindowFinished(window))

    def _state(self, ep: _Epoch) -> policy.EpochState:
        more = self.drafter is not None and (
            len(ep.drafts) < ep.requested or self._draft_room(ep.base, ep.decided, ep.requested) > 0
        )
        return policy.EpochState(
            drafts=len(ep.drafts),
            decided=ep.decided,
            dispatched_end=ep.dispatched_end,
            windows=len(ep.windows),
            applied=ep.applied,
            in_flight=len(ep.in_flight()),
            budget=ep.decided + self._remaining() - 1,  # drafts from here on are never verified
            more_drafts=more,
            critical_start=ep.windows[ep.applied].start if ep.applied < len(ep.windows) else 0,
            critical_end=ep.windows[ep.applied].end if ep.applied < len(ep.windows) else 0,
        )

    def _dispatch_ready(self, ep: _Epoch, sp: int) -> None:
        state = self._state(ep)
        critical = ep.windows[ep.applied] if ep.applied < len(ep.windows) else None
        if critical is not None and critical.request.yields and not critical.task.done():
            if policy.withdraw_yielding(state, self.cfg.lookahead):
                self._drop_yielding(ep)  # its full window goes out instead, at once
                state = self._state(ep)
        load = self.target.load()
        windows = policy.windows_to_dispatch(state, self.cfg.lookahead, sp, load)
        for start, end in windows:
            self._dispatch(ep, start, end)
        yielding = None
        if self.cfg.yielding and not windows and not ep.hold_yielding:
            yielding = policy.yielding_window(state, self.cfg.lookahead, load)
        if yielding is not None:
            self.stats.windows_yielding += 1
            self._dispatch(ep, *yielding, yields=True)
        self._mark_urgent(ep)

    def _mark_urgent(self, ep: _Epoch) -> None:
        if ep.stream is not None:
            ep.stream.set_urgent(ep.base + policy.urgent_until(self._state(ep), self.cfg.lookahead))

    def _open_drafter(self, ep: _Epoch, sp: int) -> None:
        """Ask the drafter for the rules' credit (``policy.draft_credit``: at most (SP + 1) x L drafts
        ahead of the decided position). One stream serves the epoch: it is opened with the first
        credit and granted more as windows are applied, so the drafter never waits for a new call
        between windows."""
        if self.drafter is None or self._done():
            return
        room = policy.draft_credit(ep.requested, ep.decided, self.cfg.lookahead, sp,
                                   self._draft_room(ep.base, ep.decided, ep.requested))
        if room <= 0:
            return
        ep.requested += room
        if ep.stream is not None:
            ep.stream.grant(room)
            return
        prefix = self.seq[: ep.base] + [d.token_id for d in ep.drafts]
        stream = self.drafter.open(self.session_id, prefix, room, self.cfg.rejection)
        ep.stream = stream
        self._mark_urgent(ep)
        ep.reader = asyncio.create_task(self._read_drafts(ep, stream))

    async def _read_drafts(self, ep: _Epoch, stream: DraftStream) -> None:
        try:
            async for d in stream:
                ep.drafts.append(d)
                self.stats.drafts_proposed += 1
                ep.events.put_nowait(_DraftArrived(d))
        except asyncio.CancelledError:
            stream.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - the drafter may die; continue target-only
            log.warning("session %s: drafter failed (%s); continuing target-only", self.session_id, exc)
            self.stats.drafter_failed = True
            self.drafter = None
        ep.events.put_nowait(_DraftStreamEnded(stream))

    async def _close_epoch(self, ep: _Epoch) -> None:
        """Cancel everything still running for this epoch (real cancels) and account for waste."""
        if ep.stream is not None:
            ep.stream.cancel()
        pending: list[asyncio.Task[WindowResult] | asyncio.Task[None]] = []
        if ep.reader is not None and not ep.reader.done():
            ep.reader.cancel()
            pending.append(ep.reader)  # awaited with the windows: no task outlives its epoch
        for w in ep.windows[ep.applied :]:
            if not w.task.done():
                w.task.cancel()
                pending.append(w.task)
                self.stats.windows_cancelled += 1
        pending += [w.task for w in ep.dropped if not w.task.done()]  # withdrawn: cancelled already
        try:
            if pending:
                # Waits for the cancels to reach the targets. Unlike awaiting each task (whose
                # CancelledError could not be told from a cancel of this request), asyncio.wait raises
                # only when *this* task is cancelled, so a request cancelled here stops here.
                await asyncio.wait(pending)
        finally:
            for i, w in enumerate(ep.windows + ep.dropped):
                if w.task.done() and not w.task.cancelled():
                    w.task.exception()  # retrieved: a failure after the epoch ended is not an error
                self._account(w.request)
                if i >= ep.applied:  # cancelled, dropped, or computed and never applied: time lost
                    self.stats.wasted_target_s += w.request.timing.held_s
