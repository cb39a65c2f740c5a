"""The model's worker thread: one job at a time, lowest priority first (urgent before background,
then the caller's order), in submission order within a priority (a single-thread
``ThreadPoolExecutor`` whose queue is ordered by priority).

A job's priority is read each time the worker picks the next job, so a queued job that becomes
urgent (a speculative draft the caller now needs) moves ahead at once. A running BACKGROUND job
given a ``preempt`` callback is preempted (the callback stops it) as soon as an URGENT job is
queued, so background work never delays urgent work by more than the stop. The queue holds at most
one live job per caller (the services chain their jobs), so picking by a scan is cheap; a job
cancelled while queued reports priority CANCELLED and leaves first, so that dead jobs never pile up
behind urgent work.

Background work may also be held back under load (``background_limit`` < 1): the worker keeps the
share of recent time it spent running urgent jobs (``UrgentLoad``, an exponential moving average
over time) and starts a background job only while that share is below the limit. A background job
only runs when no urgent one waits, but on a worker that urgent jobs keep nearly busy the gaps are
short: the background job is mostly preempted, or done and thrown away, and its compute and messages
still cost the machine. Held jobs wait (their priority may turn urgent meanwhile) until the share
has decayed below the limit."""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

# A job that was cancelled while queued: it only has to be taken off the queue (it ends at once), so
# it goes first, even before urgent work, and is never held back.
CANCELLED = -1
URGENT = 0
BACKGROUND = 1
# (CANCELLED, URGENT or BACKGROUND, then an order among callers: lower first).
Priority = tuple[int, int]


def _urgent() -> Priority:
    return (URGENT, 0)


class UrgentLoad:
    """The share of recent time spent running urgent jobs: an exponential moving average over time,
    with time constant ``tau_s``, of 1 while an urgent job runs and 0 otherwise."""

    def __init__(self, tau_s: float = 0.25, now: float | None = None) -> None:
        self.tau_s = tau_s
        self._level = 0.0
        self._since = time.perf_counter() if now is None else now
        self._urgent = False

    def level(self, now: float) -> float:
        target = 1.0 if self._urgent else 0.0
        decay = math.exp(-max(0.0, now - self._since) / self.tau_s)
        return target + (self._level - target) * decay

    def set(self, urgent: bool, now: float) -> None:
        """From ``now`` on, an urgent job runs (True) or not."""
        self._level = self.level(now)
        self._since = now
        self._urgent = urgent

    def seconds_until_below(self, limit: float, now: float) -> float:
        """How long until the share falls below ``limit`` if no urgent job starts (0: it is below)."""
        level = self.level(now)
        if level < limit:
            return 0.0
        if self._urgent or limit <= 0:
            return self.tau_s
        return self.tau_s * math.log(level / limit) + 1e-4


@dataclass
class _Entry:
    order: int
    future: Future[Any]
    fn: Callable[[], Any]
    priority: Callable[[], Priority]
    preempt: Callable[[], None] | None = None


class PriorityWorker:
    def __init__(self, name: str = "model-worker", background_limit: float = 1.0, load_tau_s: float = 0.25) -> None:
        """``background_limit``: start background jobs only while the urgent share of recent time
        (``UrgentLoad`` with ``load_tau_s``) is below it (1.0: always, 0.0: never)."""
        self.background_limit = background_limit
        self.load = UrgentLoad(load_tau_s)
        self.background_held_s = 0.0  # seconds the worker stayed idle holding background jobs back
        self._entries: list[_Entry] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._running: _Entry | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(
        self,
        fn: Callable[..., T],
        *args: Any,
        priority: Callable[[], Priority] = _urgent,
        preempt: Callable[[], None] | None = None,
    ) -> Future[T]:
        """Run ``fn(*args)`` on the worker thread; among queued jobs the lowest ``priority()`` (read
        when the worker is free) goes first, then the oldest. ``preempt`` stops the job once it runs
        (called at most once, when an URGENT job comes while it runs as BACKGROUND)."""
        future: Future[T] = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("cannot schedule new jobs after shutdown")
            entry = _Entry(next(self._order), future, lambda: fn(*args), priority, preempt)
            self._entries.append(entry)
            self._cond.notify()
            running = self._running
            if (
                running is not None
                and running.preempt is not None
                and priority()[0] == URGENT
                and running.priority()[0] == BACKGROUND
            ):
                stop, running.preempt = running.preempt, None
                stop()
        return future

    def reprioritized(self) -> None:
        """A queued job's priority changed (e.g. a held background job is urgent now): pick again."""
        with self._cond:
            self._cond.notify()

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """No more jobs; queued ones are cancelled (``cancel_futures``) or run first; the thread ends."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            cancelled, self._entries = (self._entries, []) if cancel_futures else ([], self._entries)
            self._cond.notify()
        for entry in cancelled:
            entry.future.cancel()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    def _next(self) -> _Entry | None:
        with self._cond:
            while True:
                if not self._entries:
                    if self._closed:
                        return None
                    self._cond.wait()
                    continue
                entry = min(self._entries, key=lambda e: (e.priority(), e.order))
                urgent = entry.priority()[0] <= URGENT
                now = time.perf_counter()
                hold = 0.0 if urgent or self._closed else self._hold_s(now)
                if hold <= 0:
                    break
                self._cond.wait(hold)  # until a new job, a changed priority or the load has decayed
                self.background_held_s += time.perf_counter() - now
            self._entries.remove(entry)
            self._running = entry
            self.load.set(entry.priority()[0] == URGENT, now)  # a cancelled job ends at once: no load
            return entry

    def _hold_s(self, now: float) -> float:
        """How long to hold background work back (0: start it now)."""
        if self.background_limit >= 1.0:
            return 0.0
        return self.load.seconds_until_below(self.background_limit, now)

    def _loop(self) -> None:
        while (entry := self._next()) is not None:
            if not entry.future.set_running_or_notify_cancel():
                continue
            try:
                result = entry.fn()
            except BaseException as exc:  # noqa: BLE001 - delivered to the caller through the future
                self._done(entry)
                entry.future.set_exception(exc)
            else:
                self._done(entry)
                entry.future.set_result(result)

    def _done(self, entry: _Entry) -> None:
        with self._cond:
            if self._running is entry:
                self._running = None
                self.load.set(False, time.perf_counter())
