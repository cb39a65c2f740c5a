"""DSI's load-aware decision rules, pure (no asyncio, no grpc, no torch): which windows a request
dispatches now, and which of its drafts are urgent. The scheduler (``scheduler.py``) feeds them a
snapshot of one request's epoch and of the load on the shared targets; unit tests feed them
scripted snapshots.

Speculation spends only capacity nobody else needs (docs/architecture.md, "A request, end to end"):

- The request's *critical* window (rank 0: it computes the first undecided position) goes out as
  soon as it carries ``lookahead`` drafts, or every draft it will ever get. A shorter critical
  window, or the zero-draft window at the start of an epoch (the non-SI step), goes out only while
  a target instance would otherwise idle: under load each forward must carry a full window.
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
    """The shared targets, seen from one request: instances idle that nobody is waiting for."""

    spare_targets: int



def windows_to_dispatch(state: EpochState, lookahead: int, sp: int, load: Load) -> list[tuple[int, int]]:
    """The windows (start, end) over drafts [start, end) to dispatch now, in order."""
    out: list[tuple[int, int]] = []
    spare = load.spare_targets
    start = state.dispatched_end
    in_flight = state.in_flight
    usable = min(state.drafts, state.budget)
    critical_idle = state.applied == state.windows
    # A short critical window (window 0, say) computes: the full window after it goes without spare.
    follows_short = not critical_idle and state.critical_end - state.critical_start < lookahead
    while in_flight < sp:
        available = usable - start
        last = not state.more_drafts or usable >= state.budget  # no more drafts will come for it
        complete = available >= lookahead or (available > 0 and last)
        if critical_idle and not out:
            epoch_start = state.windows == 0
            if not (complete or ((spare > 0 or last) and (available > 0 or epoch_start))):
                return out
        elif not (complete and (spare > 0 or follows_short)):
            return out
        follows_short = False
        end = start + min(available, lookahead)
        out.append((start, end))
        spare = max(0, spare - 1)
        start = end
        in_flight += 1
    return out


def urgent_until(state: EpochState, lookahead: int) -> int:
    """Drafts with an index below this are urgent: those a full window from the request's critical
    position needs. While a full critical window computes, its drafts are made and every further
    draft is speculation (background); while a short one (or window 0) computes, the drafts that
    would fill it are still needed next; with no window computing, the next ``lookahead`` are."""
    if state.applied < state.windows:
        return max(state.critical_end, state.critical_start + lookahead)
    return state.decided + lookahead
