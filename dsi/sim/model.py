"""Time model of non-SI, SI and DSI decoding, with no models in it (Timor et al., ICLR 2025).

Terms (all times in units of ``target_latency``, the latency of one target forward pass):

- **target latency** t: one ``Verify`` takes t whatever the number of positions it scores.
- **drafter latency** c: the drafter's latency per draft token, as a fraction of t (c > 0; c > 1
  means a drafter slower than the target).
- **acceptance rate** a: each draft is accepted independently with probability a (the i.i.d.
  model of the paper).
- **lookahead** L: drafts per SI round, and drafts per DSI window.
- **SP degree** N: number of target instances, i.e. windows that may be in flight at once.
- **committed prefix**: tokens decided so far; every position is decided exactly once.
- **window**: one ``Verify`` over drafts ``[s, e)``; it scores positions ``s..e`` (``e - s + 1``
  tokens). Position ``e``, after the last draft, is the **bonus** position.
- **epoch**: everything launched from one committed prefix; a rejection ends it.

non-SI costs t per token. SI alternates L drafts (L c) and one verification (t) and commits the
accepted prefix plus one token per round, so its expected time per token is
``(L c + 1) / E[n]`` with ``E[n] = (1 - a^(L+1)) / (1 - a)``. DSI is a discrete-event Monte Carlo of
the scheduler described in ``docs/architecture.md`` section 3 (the orchestrator runs the same rules):

1. An epoch starts from the committed prefix at time T: window 0 (zero drafts, it scores the next
   position: the non-SI step) is dispatched at T, and the drafter starts at T (draft i is ready at
   T + (i + 1) c).
2. Whenever L more drafts have arrived beyond the end of the last dispatched window (or beyond the
   first uncommitted position, when no window is in flight) and fewer than N windows are in flight,
   the next window is dispatched over them. The drafter never runs more
   than (N + 1) L drafts ahead of the committed prefix (backpressure).
3. Results are applied in window order. Committed positions are skipped; a draft is accepted with
   probability a, else the target's token is committed and the epoch ends (every in-flight window
   and the drafter are cancelled, a new epoch starts at once). At the bonus position e: if draft e
   exists it is accepted with probability a (else reject as above); if it does not exist yet, the
   target's token is committed and a new epoch starts (a *resync*).
4. Critical path: after applying, if no window is in flight, a window from the first uncommitted
   position over the drafts there are (fewer than L; none is a zero-draft window) is dispatched at
   once. (Positions decided by the last window's bonus are not scored again.)
5. A run stops once ``tokens`` tokens are committed; its time per token is its total time divided
   by the tokens it committed (the last window may commit a few more than ``tokens``).

Since each draft's fate is i.i.d., an epoch's randomness is one number: K, the index of its first
rejected draft (geometric; infinite when a = 1). The same K sequence is reused for every lookahead
and SP degree with one seed (common random numbers), so comparisons between settings are sharp.
"""

from __future__ import annotations

import math
import sys
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

__all__ = [
    "SimResult",
    "SimSettings",
    "Suggestion",
    "best_lookahead",
    "dsi_pipeline_bound",
    "si_analytic_time_per_token",
    "simulate",
    "suggest",
]

# Two events closer than this (in units of the target latency) are simultaneous; window
# completions are then handled before dispatches, so a freed target is reused at once.
_TIE = 1e-9


@dataclass(frozen=True)
class SimSettings:
    """Inputs of one simulation.

    Attributes:
        drafter_latency: c, drafter latency per draft token as a fraction of ``target_latency``.
        acceptance: a, probability that one draft is accepted (i.i.d.), in [0, 1].
        lookahead: L >= 1, drafts per SI round and per DSI window.
        sp: N >= 1, SP degree: target instances, hence windows in flight at once, for DSI.
        target_latency: latency of one target forward pass; results are in this unit
            (1.0: "target forward passes"; 30.0 with milliseconds: ms).
        tokens: tokens to commit per Monte Carlo run.
        runs: Monte Carlo runs averaged.
        seed: seed of numpy's Generator; equal settings and seed give equal results.
    """

    drafter_latency: float
    acceptance: float
    lookahead: int
    sp: int
    target_latency: float = 1.0
    tokens: int = 200
    runs: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        _check_real("drafter_latency", self.drafter_latency, low=0.0, low_open=True)
        _check_real("acceptance", self.acceptance, low=0.0, high=1.0)
        _check_int("lookahead", self.lookahead, low=1)
        _check_int("sp", self.sp, low=1)
        _check_real("target_latency", self.target_latency, low=0.0, low_open=True)
        _check_int("tokens", self.tokens, low=1)
        _check_int("runs", self.runs, low=1)
        _check_int("seed", self.seed, low=0)


@dataclass
class SimResult:
    """Expected time per token (in units of ``target_latency``) and speedups for one setting.

    Attributes:
        nonsi: target-only decoding, one target pass per token.
        si: SI, Monte Carlo mean.
        si_analytic: SI, closed form ``(L c + 1) / E[n]`` (times the target latency).
        dsi: DSI, Monte Carlo mean over runs of each run's time per token.
        dsi_std: standard deviation across runs of each run's DSI time per token.
        required_sp: most windows in flight at once when DSI runs with unlimited targets (same
            draws); more than ``sp`` means the setting's SP degree throttled DSI.
        speedup_dsi_over_si: ``si_analytic / dsi``.
        speedup_dsi_over_nonsi: ``nonsi / dsi``.
        speedup_si_over_nonsi: ``nonsi / si_analytic``.
    """

    nonsi: float
    si: float
    si_analytic: float
    dsi: float
    dsi_std: float
    required_sp: int
    speedup_dsi_over_si: float
    speedup_dsi_over_nonsi: float
    speedup_si_over_nonsi: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class Suggestion:
    """What to run for a drafter/target pair: the lookahead and the smallest SP degree whose DSI
    time per token is within ``tolerance`` of the best over all SP degrees up to ``max_sp``.

    Attributes:
        lookahead: best L for DSI at SP degree ``sp``.
        sp: suggested SP degree (number of target instances).
        result: the full simulation at (lookahead, sp).
        best_dsi: the best DSI time per token found over all SP degrees up to ``max_sp``.
        best_sp: the SP degree that gave ``best_dsi``.
        tolerance: the relative slack allowed (0.02: within 2%).
        dsi_by_sp: best DSI time per token for each SP degree 1..max_sp.
    """

    lookahead: int
    sp: int
    result: SimResult
    best_dsi: float
    best_sp: int
    tolerance: float
    dsi_by_sp: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "lookahead": self.lookahead,
            "sp": self.sp,
            "best_dsi": self.best_dsi,
            "best_sp": self.best_sp,
            "tolerance": self.tolerance,
            "dsi_by_sp": {str(k): v for k, v in self.dsi_by_sp.items()},
            "result": self.result.to_dict(),
        }


def _check_real(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")


def _check_int(name: str, value: object, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")


def si_analytic_time_per_token(drafter_latency: float, acceptance: float, lookahead: int) -> float:
    """Expected SI time per token in target latencies: ``(L c + 1) / E[n]``, where
    ``E[n] = (1 - a^(L+1)) / (1 - a)`` (``L + 1`` when a = 1) is the expected tokens per round."""
    a, L = acceptance, lookahead
    expected_tokens = L + 1.0 if a >= 1.0 else (1.0 - a ** (L + 1)) / (1.0 - a)
    return (L * drafter_latency + 1.0) / expected_tokens


def dsi_pipeline_bound(drafter_latency: float, lookahead: int, tokens: int) -> float:
    """DSI time per token when every draft is accepted and targets are unlimited (a = 1).

    Window k >= 1 (drafts ``[(k-1) L, k L)``) is dispatched at ``k L c`` and commits through
    position ``k L`` one target latency later, so the run ends at ``k L c + 1`` with ``k L + 1``
    tokens, ``k = ceil((tokens - 1) / L)``: the drafter's speed c per token plus the pipeline start
    (one target latency) spread over the run. Valid for ``c <= 1``.
    """
    k = max(1, math.ceil((tokens - 1) / lookahead))
    return (k * lookahead * drafter_latency + 1.0) / (k * lookahead + 1)


def _first_rejections(acceptance: float, runs: int, tokens: int, rng: np.random.Generator) -> np.ndarray:
    """K for up to ``tokens`` epochs per run: index of the epoch's first rejected draft.

    Every epoch commits at least one token, so ``tokens`` epochs always suffice.
    """
    shape = (runs, tokens)
    if acceptance >= 1.0:
        return np.full(shape, np.iinfo(np.int64).max, dtype=np.int64)
    return rng.geometric(1.0 - acceptance, size=shape).astype(np.int64) - 1  # [runs, tokens]


def _dsi_run(
    c: float, L: int, n_targets: int | None, tokens: int, first_reject: np.ndarray
) -> tuple[float, int, float]:
    """One DSI run in target latencies; returns (time per token, most windows in flight, the time at
    which ``tokens`` tokens were committed).

    ``n_targets=None`` means unlimited targets (and no backpressure). ``first_reject[i]`` is K
    for epoch i. Inlined for speed: the heatmap runs this loop hundreds of thousands of times.
    """
    limit = n_targets if n_targets is not None else sys.maxsize
    ahead = (n_targets + 1) * L if n_targets is not None else math.inf
    inf = math.inf

    now = 0.0
    epoch = 0
    most_in_flight = 1
    # Epoch state. Positions and draft indices are relative to the epoch's committed prefix.
    prefix = 0  # committed tokens before this epoch
    k_rej = int(first_reject[0])
    p = 0  # first uncommitted position
    base_time, base_index = now, 0  # draft base_index + j is ready at base_time + (j + 1) c
    in_flight: deque[tuple[int, int, float]] = deque([(0, 0, now + 1.0)])  # (s, e, finish)
    dispatched_end = 0

    while True:
        cap = p + ahead
        t_done = in_flight[0][2] if in_flight else inf
        t_dispatch = inf
        if len(in_flight) < limit:
            want = dispatched_end + L
            if want <= cap:
                t_dispatch = max(now, base_time + (want - base_index) * c)
        if t_dispatch < t_done - _TIE:
            # Rule 2: L new drafts are ready and a target is free.
            now = t_dispatch
            in_flight.append((dispatched_end, dispatched_end + L, now + 1.0))
            dispatched_end += L
            if len(in_flight) > most_in_flight:
                most_in_flight = len(in_flight)
            continue

        if t_done == inf:  # unreachable: rule 4 keeps a window in flight
            raise RuntimeError("DSI simulation stalled with no window in flight")
        # Rule 3: the oldest window completes; apply its positions.
        now = t_done
        s, e, _ = in_flight.popleft()
        drafted = base_index + int((now - base_time) / c + _TIE)
        if drafted > cap:
            drafted = int(cap)
        new_epoch = True
        if p > e:  # everything it scored is already committed
            new_epoch = False
        elif k_rej < e:  # a draft inside the window is rejected: target token at k_rej
            p = k_rej + 1
        else:
            # All its drafts accepted; the bonus position e: accept draft e, reject it, or resync.
            new_epoch = not (drafted > e and k_rej > e)
            p = e + 1

        if prefix + p >= tokens:
            return now / (prefix + p), most_in_flight, now

        if new_epoch:
            epoch += 1
            prefix += p
            k_rej = int(first_reject[epoch])
            p = 0
            base_time, base_index = now, 0
            in_flight.clear()
            in_flight.append((0, 0, now + 1.0))
            dispatched_end = 0
            continue

        # Backpressure: a drafter that was paused at the old cap resumes now.
        if drafted >= cap:
            base_time, base_index = now, int(cap)
            drafted = base_index
        cap = p + ahead
        if not in_flight:
            dispatched_end = max(dispatched_end, p)  # a new critical window starts at p (rule 4)
        # Rule 2 for drafts that arrived while every target was busy.
        while len(in_flight) < limit and drafted >= dispatched_end + L:
            in_flight.append((dispatched_end, dispatched_end + L, now + 1.0))
            dispatched_end += L
        # Rule 4: keep a window on the first uncommitted position.
        if not in_flight and len(in_flight) < limit and dispatched_end <= drafted:
            in_flight.append((dispatched_end, drafted, now + 1.0))
            dispatched_end = drafted
        if len(in_flight) > most_in_flight:
            most_in_flight = len(in_flight)


def _rngs(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent streams for SI and DSI, so that each is the same whichever is computed."""
    si_seq, dsi_seq = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(si_seq), np.random.default_rng(dsi_seq)


def _si_monte_carlo(s: SimSettings, rng: np.random.Generator) -> float:
    """Mean over runs of SI time per token (target latencies), rounds until ``tokens`` committed."""
    L = s.lookahead
    if s.acceptance >= 1.0:
        per_round = np.full((s.runs, s.tokens), L + 1, dtype=np.int64)
    else:
        accepted = rng.geometric(1.0 - s.acceptance, size=(s.runs, s.tokens)) - 1  # [runs, rounds]
        per_round = np.minimum(accepted, L) + 1  # [runs, rounds]: accepted prefix + 1
    committed = np.cumsum(per_round, axis=1)  # [runs, rounds]
    rounds = np.argmax(committed >= s.tokens, axis=1) + 1  # [runs]; one token per round suffices
    total = committed[np.arange(s.runs), rounds - 1]  # [runs]
    per_token = rounds * (L * s.drafter_latency + 1.0) / total  # [runs]
    return float(per_token.mean())


def _dsi_monte_carlo(
    s: SimSettings, n_targets: int | None, runs: int | None = None
) -> tuple[np.ndarray, int]:
    """Per-run DSI time per token (target latencies) and the most windows in flight."""
    _, rng = _rngs(s.seed)
    draws = _first_rejections(s.acceptance, s.runs, s.tokens, rng)  # [runs, epochs]
    n = s.runs if runs is None else min(runs, s.runs)
    times = np.empty(n)
    most = 0
    for r in range(n):
        times[r], in_flight, _ = _dsi_run(s.drafter_latency, s.lookahead, n_targets, s.tokens, draws[r])
        most = max(most, in_flight)
    return times, most


def _dsi_mean(s: SimSettings) -> float:
    times, _ = _dsi_monte_carlo(s, s.sp)
    return float(times.mean())


def simulate(settings: SimSettings) -> SimResult:
    """Expected time per token of non-SI, SI (closed form and Monte Carlo) and DSI."""
    s = settings
    t = s.target_latency
    si_rng, _ = _rngs(s.seed)
    si = _si_monte_carlo(s, si_rng) * t
    si_analytic = si_analytic_time_per_token(s.drafter_latency, s.acceptance, s.lookahead) * t
    times, _ = _dsi_monte_carlo(s, s.sp)
    # The most windows in flight is reached early in a long epoch; a few runs find it.
    _, required_sp = _dsi_monte_carlo(s, None, runs=3)
    dsi = float(times.mean()) * t
    dsi_std = float(times.std()) * t
    nonsi = t
    return SimResult(
        nonsi=nonsi,
        si=si,
        si_analytic=si_analytic,
        dsi=dsi,
        dsi_std=dsi_std,
        required_sp=required_sp,
        speedup_dsi_over_si=si_analytic / dsi,
        speedup_dsi_over_nonsi=nonsi / dsi,
        speedup_si_over_nonsi=nonsi / si_analytic,
    )


def best_lookahead(
    c: float,
    a: float,
    sp: int,
    lookaheads: Iterable[int] = range(1, 11),
    **kw: Any,
) -> tuple[int, SimResult]:
    """The lookahead that minimises DSI time per token at SP degree ``sp``, and its full result.

    ``kw`` is passed to :class:`SimSettings` (``target_latency``, ``tokens``, ``runs``, ``seed``).
    Ties go to the smaller lookahead.
    """
    candidates = sorted(set(lookaheads))
    if not candidates:
        raise ValueError("lookaheads must not be empty")
    best_l, best_time = candidates[0], math.inf
    for L in candidates:
        time = _dsi_mean(SimSettings(drafter_latency=c, acceptance=a, lookahead=L, sp=sp, **kw))
        if time < best_time:
            best_l, best_time = L, time
    return best_l, simulate(SimSettings(drafter_latency=c, acceptance=a, lookahead=best_l, sp=sp, **kw))


def suggest(
    c: float,
    a: float,
    max_sp: int,
    lookaheads: Iterable[int] = range(1, 11),
    tolerance: float = 0.02,
    **kw: Any,
) -> Suggestion:
    """Lookahead and SP degree to run: the smallest SP degree in ``1..max_sp`` whose best DSI time
    per token is within ``tolerance`` (relative) of the best over all of them, with its lookahead.

    ``kw`` is passed to :class:`SimSettings` (``target_latency``, ``tokens``, ``runs``, ``seed``).
    """
    _check_int("max_sp", max_sp, low=1)
    _check_real("tolerance", tolerance, low=0.0)
    candidates = sorted(set(lookaheads))
    if not candidates:
        raise ValueError("lookaheads must not be empty")
    base = SimSettings(drafter_latency=c, acceptance=a, lookahead=candidates[0], sp=1, **kw)
    best_by_sp: dict[int, tuple[float, int]] = {}
    for n in range(1, max_sp + 1):
        best_by_sp[n] = min((_dsi_mean(replace(base, lookahead=L, sp=n)), L) for L in candidates)
    best_sp = min(best_by_sp, key=lambda n: (best_by_sp[n][0], n))
    best_time = best_by_sp[best_sp][0]
    sp = min(n for n, (time, _) in best_by_sp.items() if time <= best_time * (1.0 + tolerance))
    lookahead = best_by_sp[sp][1]
    return Suggestion(
        lookahead=lookahead,
        sp=sp,
        result=simulate(replace(base, lookahead=lookahead, sp=sp)),
        best_dsi=best_time * base.target_latency,
        best_sp=best_sp,
        tolerance=tolerance,
        dsi_by_sp={n: time * base.target_latency for n, (time, _) in best_by_sp.items()},
    )
