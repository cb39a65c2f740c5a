"""Automatic lookahead and SP degree: chosen per request from what the orchestrator measures (a target
forward's latency, the drafter's latency per draft, the acceptance rate), by the same time model as
``dsi simulate suggest`` (``dsi.sim.model``), and re-chosen as the measurements move.

Estimates are exponentially weighted moving averages: target latency over decode windows (a window
that had at most ``DECODE_TOKENS`` tokens to compute on its instance, so prompt prefills do not count),
drafter latency over the gaps between consecutive drafts of a stream that had credit, acceptance over
finished requests' verified drafts. Until each has a few samples the fallback choice stands. The
model runs in units of the target latency, so only c = drafter / target and a matter: they are
rounded onto a grid (c in 10% steps, a in 0.05 steps) and each grid point is simulated once.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

# A window with at most this many tokens to compute on its instance is a decode step, not a prefill.
DECODE_TOKENS = 32
MIN_SAMPLES = 8


@dataclass(frozen=True)
class Choice:
    lookahead: int
    sp: int  # windows in flight per request (the SP degree)
    auto: bool  # chosen from measurements (False: the fallback, measurements not there yet)


class Ewma:
    def __init__(self, alpha: float = 0.05) -> None:
        self.alpha = alpha
        self.value: float | None = None
        self.samples = 0

    def add(self, x: float, weight: float = 1.0) -> None:
        if not math.isfinite(x) or weight <= 0:
            return
        a = 1.0 - (1.0 - self.alpha) ** weight
        self.value = x if self.value is None else self.value + a * (x - self.value)
        self.samples += 1


class Estimates:
    """What the orchestrator has measured; fed by the pool, the drafter client and finished requests."""

    def __init__(self) -> None:
        self.target_s = Ewma()
        self.draft_s = Ewma()
        self.acceptance = Ewma(alpha=0.1)

    def window(self, held_s: float, computed_tokens: int) -> None:
        if computed_tokens <= DECODE_TOKENS:
            self.target_s.add(held_s)

    def draft_gap(self, seconds: float) -> None:
        self.draft_s.add(seconds)

    def request(self, accepted: int, verified: int) -> None:
        if verified > 0:
            self.acceptance.add(accepted / verified, weight=min(verified, 64) / 16)

    def ready(self) -> bool:
        return all(e.value is not None and e.samples >= MIN_SAMPLES
                   for e in (self.target_s, self.draft_s, self.acceptance))


C_STEP = math.log(1.1)  # the grid: c in 10% steps, a in 0.05 steps
A_STEP = 0.05


def grid_point(c: float, a: float) -> tuple[float, float]:
    """c rounded on a 10% log grid (within [0.005, 4]), a to 0.05 (within [0, 0.95])."""
    c = min(4.0, max(0.005, c))
    step = C_STEP
    c = round(math.exp(round(math.log(c) / step) * step), 4)
    return c, round(min(0.95, max(0.0, round(a / 0.05) * 0.05)), 2)


class Tuner:
    """Lookahead and SP degree per request (``choose``); simulations cached per grid point."""

    def __init__(self, max_lookahead: int, fallback_lookahead: int = 5, runs: int = 24, tokens: int = 96) -> None:
        self.estimates = Estimates()
        self.max_lookahead = max(1, max_lookahead)
        self.fallback_lookahead = fallback_lookahead
        self.runs, self.tokens = runs, tokens
        # (c, a, healthy targets, fixed SP or 0) -> (lookahead, SP degree)
        self._cache: dict[tuple[float, float, int, int], tuple[int, int]] = {}
        # Per (pool size, fixed SP or 0), the last choice made from measurements.
        self._latest: dict[tuple[int, int], Choice] = {}
        self._point: tuple[float, float] | None = None  # the grid point in use
        self._lock = threading.Lock()

    def point(self) -> tuple[float, float] | None:
        """The grid point of the current estimates, with hysteresis: it stays where it was until the
        estimates are 1.5 grid steps away (jitter at a boundary would otherwise simulate and switch
        back and forth)."""
        e = self.estimates
        if not e.ready():
            return None
        assert e.target_s.value is not None and e.draft_s.value is not None and e.acceptance.value is not None
        c, a = e.draft_s.value / max(e.target_s.value, 1e-6), e.acceptance.value
        last = self._point
        if last is not None and abs(math.log(max(c, 1e-9) / last[0])) < 1.5 * C_STEP \
                and abs(a - last[1]) < 1.5 * A_STEP:
            return last
        self._point = grid_point(c, a)
        return self._point

    def cached(self, targets: int, sp: int | None = None) -> Choice | None:
        """The choice for the current estimates if it is known (no simulation needed). ``sp``: the
        request's fixed SP degree (the lookahead is chosen for it), None to choose it too."""
        point = self.point()
        if point is None:
            return Choice(self.fallback_lookahead, sp or max(1, targets), auto=False)
        hit = self._cache.get((*point, max(1, targets), sp or 0))
        return Choice(hit[0], hit[1], auto=True) if hit is not None else None

    def lookup(self, targets: int, sp: int | None = None) -> tuple[Choice | None, bool]:
        """What a request uses now without waiting for a simulation, and whether the current point
        still needs one (run ``choose`` in the background): the point's choice when known, else the
        last choice made for this pool size (the estimates moved to a new point), else None (the
        first choice: the caller simulates it)."""
        known = self.cached(targets, sp)
        if known is not None:
            return known, False
        return self._latest.get((max(1, targets), sp or 0)), True

    def choose_si(self) -> Choice:
        """SI's lookahead for the current estimates: the closed form's best (SI runs one window)."""
        point = self.point()
        if point is None:
            return Choice(self.fallback_lookahead, 1, auto=False)
        from dsi.sim.model import si_analytic_time_per_token

        c, a = point
        best = min(range(1, min(self.max_lookahead, 10) + 1), key=lambda n: si_analytic_time_per_token(c, a, n))
        return Choice(best, 1, auto=True)

    def choose(self, targets: int, sp: int | None = None) -> Choice:
        """The choice for the current estimates and this many healthy targets (simulates on a cache
        miss: tens of milliseconds; call it off the event loop). With ``sp`` fixed, the lookahead
        best at that SP degree; else the SP degree too (``suggest``: the smallest within 2% of the
        best)."""
        known = self.cached(targets, sp)
        if known is not None:
            if known.auto:
                self._latest[(max(1, targets), sp or 0)] = known
            return known
        point = self.point()
        assert point is not None
        key = (*point, max(1, targets), sp or 0)
        lookaheads = range(1, min(self.max_lookahead, 10) + 1)
        from dsi.sim.model import best_lookahead, suggest

        if sp:
            best, _ = best_lookahead(point[0], point[1], sp, lookaheads, runs=self.runs, tokens=self.tokens)
            choice = Choice(best, sp, auto=True)
        else:
            s = suggest(point[0], point[1], key[2], lookaheads=lookaheads, runs=self.runs, tokens=self.tokens)
            choice = Choice(s.lookahead, s.sp, auto=True)
        with self._lock:
            self._cache[key] = (choice.lookahead, choice.sp)
            self._latest[(key[2], key[3])] = choice
        return choice
