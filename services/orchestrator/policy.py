"""DSI's decision rules, pure (no asyncio, no grpc, no torch), in one place that two drivers run: the
asyncio scheduler (``scheduler.py``, with the pool's ``placement.py``) and the multi-request
simulator (``dsi/sim/cluster.py``); ``tests/unit/test_conformance.py`` runs both on one script and
requires the same commits at the same times. The rules:

- **dispatch** (``windows_to_dispatch``, ``yielding_window``, ``withdraw_yielding``): which windows
  a request sends now, given a snapshot of its epoch and of the load on the shared targets;
- **credit** (``draft_room``, ``draft_credit``): how many drafts the request asks the drafter for;
- **apply** (``apply_window``): how a window's result decides positions, in order, and how the
  epoch ends (rejection, resync, done);
- **rank** (``window_rank``, ``queue_key``, ``preemption_victims``, ``spare_targets``): a window's
  place in its request's order and in the shared queue, which speculation a waiting critical window
  preempts, and which idle targets a request's speculation may use;
- **urgency** (``urgent_until``): which drafts the drafter makes first.

Speculation spends only capacity nobody else needs (docs/architecture.md, "A request, end to end"):

- The request's *critical* window (rank 0: it computes the first undecided position, from which
  it starts) goes out as soon as it carries ``lookahead`` drafts, or every draft it will ever get.
  A shorter critical window, or a zero-draft window (the non-SI step: at the start of an epoch, or
  whenever no draft is there yet for the first undecided position), goes out only while target
  instances would otherwise idle: more spare ones than other requests are under way (each of those
  wants one next, also one drafting now: a short window and the full one after it would leave it
  none, and it would preempt that full window), so under load each critical window that must be
  served carries a full window; and not when the request is confined to a single instance
  (``Load.confined``: its prefill budget spent), where the short window would take the instance from
  the full one.
- Held back so, the short critical window may still go out as a *yielding* window onto an instance
  idle now (``yielding_window``): any request's critical window that has to wait preempts it first,
  and then it is dropped, not queued; it never waits for an instance; its own request withdraws it
  (``withdraw_yielding``) the moment its full window can go, which takes its instance. It is the
  request's only window in flight, so dropping it leaves no gap. With many requests one drafter is
  the bottleneck and SI leaves targets idle; yielding windows turn that idle time into the target's
  next tokens while each request waits for its drafts, and cost the others no more than a cancel.
- A *speculative* window (rank >= 1) goes out only full and only onto an idle instance nobody is
  waiting for, except the full window right after a short critical one (window 0, say), which the
  request needs next almost surely and which must not wait for the short one. The pool preempts a
  running speculative window when a critical one has to wait (``pool.py``), so speculation never
  delays another request's critical path by more than the cancel.
- Drafts the request's next critical window needs are *urgent*; drafts beyond it are background
  work, which the drafter computes only when no stream has an urgent draft to make, preempted when
  one comes (``urgent_until``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class EpochState:
    """One request's epoch, as the rules see it (draft indices count from the epoch's base)."""

    drafts: int  # drafts received
    decided: int  # positions decided
    dispatched_end: int  # one past the last draft a dispatched window covers
    windows: int  # windows dispatched
    applied: int  # windows applied (in order)
    in_flight: int  # windows still computing
    budget: int  # drafts from this index on are never verified (the last position is never drafted)
    more_drafts: bool  # more drafts may still arrive (the drafter is alive and has room)
    # The first unapplied window (the critical one), if any: its first draft and one past its last.
    critical_start: int = 0
    critical_end: int = 0


@dataclass(frozen=True)
class Load:
    """The shared targets, seen from one request: instances idle that nobody is waiting for, and how
    many other requests are under way (with windows computing or waiting on them, or drafting their
    next: each will want an instance soon)."""

    spare_targets: int
    others: int = 0
    # Alone on the pool but its prefill budget spent: how many instances (those holding its
    # session) the request may use, fewer than the healthy ones (None: not confined).
    confined: int | None = None



def windows_to_dispatch(state: EpochState, lookahead: int, sp: int, load: Load) -> list[tuple[int, int]]:
    """The windows (start, end) over drafts [start, end) to dispatch now, in order."""
    out: list[tuple[int, int]] = []
    spare = load.spare_targets
    start = state.dispatched_end
    in_flight = state.in_flight
    usable = min(state.drafts, state.budget)
    critical_idle = state.applied == state.windows
    if critical_idle:
        start = max(start, state.decided)  # decided positions need no scoring again
    # A short critical window (window 0, say) computes: the full window after it goes without spare.
    follows_short = not critical_idle and state.critical_end - state.critical_start < lookahead
    # Confined to one instance (a long prompt held by one only), a short window would take it from
    # the full window after it: the request waits for full windows, as SI does.
    single = load.confined is not None and load.confined <= 1
    while in_flight < sp:
        available = usable - start
        last = not state.more_drafts or usable >= state.budget  # no more drafts will come for it
        complete = available >= lookahead or (available > 0 and last)
        if critical_idle and not out:
            fresh = start == state.decided  # a window from the first undecided position
            if not (complete or (((spare > load.others and not single) or last) and (available > 0 or fresh))):
                return out
        elif not (complete and (spare > 0 or follows_short)):
            return out
        follows_short = False
        end = start + max(0, min(available, lookahead))
        out.append((start, end))
        spare = max(0, spare - 1)
        start = end
        in_flight += 1
    return out


def yielding_window(state: EpochState, lookahead: int, load: Load) -> tuple[int, int] | None:
    """When ``windows_to_dispatch`` sends nothing: the short critical window (over the drafts there
    are, or none: the non-SI step) that it holds back for the other requests under way, sent anyway
    as a *yielding* window onto an instance idle now (a spare one). Any request's critical window
    that has to wait preempts it (before speculation, ``preemption_victims``), and a preempted
    yielding window is dropped, not queued; it never waits for an instance either; and its own
    request withdraws it the moment its full window can go out (``withdraw_yielding``). So it
    spends only target time nobody needs, and turns it into the target's next token while the
    request waits for drafts (a drafter serving many requests is then the bottleneck). It is
    always the request's only window in flight, so dropping it leaves no gap."""
    if state.applied != state.windows or load.spare_targets < 1:
        return None
    if load.confined is not None and load.confined <= 1:
        return None
    start = max(state.dispatched_end, state.decided)
    available = min(state.drafts, state.budget) - start
    if available >= lookahead or not (available > 0 or start == state.decided):
        return None
    return start, start + max(0, available)


def withdraw_yielding(state: EpochState, lookahead: int) -> bool:
    """The request's critical window is a yielding one (``yielding_window``): withdraw it (cancel it
    and send the full window instead, at once; the instance it frees goes to the queue's head, as
    any) when its full window can
    go out: ``lookahead`` drafts from its start, or more drafts than it carries and no more to come.

    Withdrawn, not kept beside the full window: kept, the yielding window's result would come first
    (a rejection there would end the epoch sooner), but ``dsi simulate load --drafter shared-age``
    put that at 0.83x the tokens per second of withdrawing at C = 4, a = 0.5 (in one run the
    drafter, the bottleneck there, made 17% more drafts)."""
    usable = min(state.drafts, state.budget)
    last = not state.more_drafts or usable >= state.budget
    return usable - state.critical_start >= lookahead or (last and usable > state.critical_end)


def urgent_until(state: EpochState, lookahead: int) -> int:
    """Drafts with an index below this are urgent: those a full window from the request's critical
    position needs. While a full critical window computes, its drafts are made and every further
    draft is speculation (background); while a short one (or window 0) computes, the drafts that
    would fill it are still needed next; with no window computing, the next ``lookahead`` are."""
    if state.applied < state.windows:
        return max(state.critical_end, state.critical_start + lookahead)
    return state.decided + lookahead


# -- credit: drafts asked of the drafter --------------------------------------------------------


def draft_room(remaining: int, decided: int, requested: int, base: int, draft_context: int = 0) -> int:
    """Drafts that may still be asked for after ``requested`` in an epoch at ``base`` (``remaining``
    tokens left to generate when the epoch has ``decided`` positions). The last position to generate
    is never drafted: the window that would verify a draft there would read one position more than
    plain decoding does (its bonus position lies past the end), and the target decides that position
    anyway. Nor is a draft asked past the drafter's context (``draft_context`` tokens; 0 = no limit)."""
    room = remaining + decided - 1 - requested
    if draft_context > 0:
        room = min(room, draft_context - base - requested)
    return room


def draft_credit(requested: int, decided: int, lookahead: int, sp: int, room: int) -> int:
    """Drafts to ask for now (<= 0: none): the drafter runs at most (SP + 1) x L drafts ahead of the
    decided position, enough for every window that may be in flight plus the next one (with SP x L,
    a single target would starve it), and never past ``room``."""
    return min((sp + 1) * lookahead - (requested - decided), room)


# -- apply: a window's result decides positions -------------------------------------------------


class Decision(enum.Enum):
    """How one position is decided."""

    ACCEPT = "accept"  # the draft equals the target's token: the draft is committed
    REJECT = "reject"  # the target's token replaces the draft: the epoch ends
    BONUS = "bonus"  # no draft there yet (the window's bonus position): the target's token stands


class EpochEnd(enum.Enum):
    REJECT = "reject"  # a draft was rejected: a new epoch from the target's token
    RESYNC = "resync"  # the bonus position with no draft: a new epoch from there
    DONE = "done"  # the request is done (token budget, EOS, stop string)


def apply_window(
    start: int,
    end: int,
    decided: int,
    drafts: int,
    accepted: Callable[[int], bool],
    commit: Callable[[int, Decision], bool],
) -> tuple[int, EpochEnd | None]:
    """Apply the result of the window over drafts [start, end) (bonus position ``end``) to an epoch
    with ``decided`` positions decided and ``drafts`` drafts received, in position order: positions
    already decided (by an earlier window's bonus) are skipped; ``accepted(i)`` says whether draft i
    equals the target's token there; ``commit(i, decision)`` commits position i and returns True
    when the request is done. Returns the positions decided and how the epoch ends (None: it goes
    on)."""
    for i in range(max(start, decided), end + 1):
        if i < drafts:
            if accepted(i):
                decided = i + 1
                if commit(i, Decision.ACCEPT):
                    return decided, EpochEnd.DONE
                continue
            return i + 1, (EpochEnd.DONE if commit(i, Decision.REJECT) else EpochEnd.REJECT)
        return i + 1, (EpochEnd.DONE if commit(i, Decision.BONUS) else EpochEnd.RESYNC)
    return decided, None


# -- rank: a window's place in its request's order and in the shared queue ----------------------


def window_rank(index: int, applied: int) -> int:
    """The rank of the epoch's window ``index`` once ``applied`` windows are applied: 0 is the
    request's critical path (it computes the first undecided position), higher is more speculative.
    A window is dispatched with its rank then, and moves up (``reprioritize``) as windows before it
    are applied."""
    return index - applied


def queue_key(rank: int, order: int) -> tuple[int, int]:
    """Order of windows waiting for a target instance: by rank (every request's critical window
    first), then first come first served (``order``: when it joined the queue).

    First come first served, not oldest request first: a DSI request drafts its next critical window
    while the current one computes, so it is ready again the moment its window ends; by request age
    the oldest requests would hold every instance back to back and the youngest wait for their first
    token until those finish (a tail with few requests left, where the pool runs below capacity).
    In arrival order every ready request takes its turn, as SI's requests do (they leave the queue
    while they draft): the longest wait between two tokens of a request is about the requests
    running over the instances, forwards (bounded by admission), and a burst of requests finishes
    together (``dsi simulate load``: by request age DSI makes 0.82x SI's tokens per second with 8
    requests on 4 targets, first come first served 1.03x)."""
    return (rank, order)


@dataclass(frozen=True)
class RunningWindow:
    """A window holding a target instance, as preemption sees it."""

    rank: int
    request_seq: int
    started: float
    preempted: bool  # already told to give its instance up
    reserved: bool = False  # its instance is promised to one critical window (not to the queue)
    yields: bool = False  # a yielding window (``yielding_window``): preempted first, then dropped


def preemption_victims(critical_waiting: int, running: Sequence[RunningWindow]) -> list[int]:
    """Indices into ``running`` of the speculative windows to preempt so that each of the
    ``critical_waiting`` critical windows in the queue has an instance coming: yielding windows
    first (``yielding_window``: they spend only time nobody needs), then the most speculative, then
    the newest request's, then the latest started (the queue's order backwards); windows already
    preempted count as instances on their way to the queue."""
    needed = critical_waiting - sum(1 for r in running if r.preempted and not r.reserved)
    candidates = sorted(
        (i for i, r in enumerate(running) if (r.rank > 0 or r.yields) and not r.preempted),
        key=lambda i: (running[i].yields, running[i].rank, running[i].request_seq, running[i].started),
        reverse=True,
    )
    return candidates[: max(0, needed)]


def spare_targets(free: int, waiting: int, quiet: bool, usable: int | None = None, headroom: int = 1) -> int:
    """Idle target instances a request's speculation may use: the ``free`` ones no ``waiting``
    window will take, only the ``usable`` ones (those warm for the request, or its prefill budget
    allows; None: all), and while other requests use the pool (not ``quiet``) less a ``headroom`` of
    instances kept for the other requests' critical windows (which would otherwise have to preempt
    speculation)."""
    spare = free - waiting
    if free and not quiet:
        spare = min((free if usable is None else usable) - waiting, spare - headroom)
    elif free and usable is not None:
        spare = min(usable - waiting, spare)
    return max(0, spare)
