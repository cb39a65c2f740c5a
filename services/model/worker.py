"""The model's worker thread: one job at a time, lowest priority first (urgent before background,
then the caller's order), in submission order within a priority (a single-thread
``ThreadPoolExecutor`` whose queue is ordered by priority).

A job's priority is read each time the worker picks the next job, so a queued job that becomes
urgent (a speculative draft the caller now needs) moves ahead at once. A running BACKGROUND job
given a ``preempt`` callback is preempted (the callback stops it) as soon as an URGENT job is
queued, so background work never delays urgent work by more than the stop. The queue holds at most
one job per caller (the services chain their jobs), so picking by a scan is cheap."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

URGENT = 0
BACKGROUND = 1
# (URGENT or BACKGROUND, then an order among callers: lower first).
Priority = tuple[int, int]


def _urgent() -> Priority:
    return (URGENT, 0)


@dataclass
class _Entry:
    order: int
    future: Future[Any]
    fn: Callable[[], Any]
    priority: Callable[[], Priority]
    preempt: Callable[[], None] | None = None


class PriorityWorker:
    def __init__(self, name: str = "model-worker") -> None:
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
            while not self._entries and not self._closed:
                self._cond.wait()
            if not self._entries:
                return None
            entry = min(self._entries, key=lambda e: (e.priority(), e.order))
            self._entries.remove(entry)
            self._running = entry
            return entry

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
