"""The model worker thread's queue: urgent jobs first, FIFO within a priority, live priorities."""

from __future__ import annotations

import threading

import pytest

from dsi.services.model.worker import BACKGROUND, URGENT, PriorityWorker

pytestmark = pytest.mark.unit


def test_urgent_jobs_run_before_queued_background_ones_and_fifo_within_a_priority() -> None:
    worker = PriorityWorker("test-worker")
    gate = threading.Event()
    order: list[str] = []
    blocker = worker.submit(gate.wait)  # holds the worker while the queue fills
    promoted = {"bg-promoted": BACKGROUND}
    futures = [
        worker.submit(order.append, "bg-1", priority=lambda: (BACKGROUND, 0)),
        worker.submit(order.append, "bg-promoted", priority=lambda: (promoted["bg-promoted"], 0)),
        worker.submit(order.append, "urgent-1"),
        worker.submit(order.append, "urgent-2", priority=lambda: (URGENT, 0)),
        worker.submit(order.append, "bg-2", priority=lambda: (BACKGROUND, 0)),
    ]
    promoted["bg-promoted"] = URGENT  # became urgent while it waited
    gate.set()
    blocker.result(timeout=5)
    for f in futures:
        f.result(timeout=5)
    worker.shutdown()
    assert order == ["bg-promoted", "urgent-1", "urgent-2", "bg-1", "bg-2"]


def test_shutdown_cancels_queued_jobs_and_refuses_new_ones() -> None:
    worker = PriorityWorker("test-worker")
    gate, started = threading.Event(), threading.Event()
    running = worker.submit(lambda: started.set() or gate.wait())
    assert started.wait(5)
    queued = worker.submit(lambda: None)
    threading.Timer(0.05, gate.set).start()
    worker.shutdown(wait=True, cancel_futures=True)
    assert running.result(timeout=5) is True
    assert queued.cancelled()
    with pytest.raises(RuntimeError):
        worker.submit(lambda: None)


def test_an_exception_reaches_the_caller_and_the_worker_goes_on() -> None:
    worker = PriorityWorker("test-worker")
    failed = worker.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failed.result(timeout=5)
    assert worker.submit(lambda: 42).result(timeout=5) == 42
    worker.shutdown()


def test_an_urgent_job_preempts_a_running_background_one_only() -> None:
    worker = PriorityWorker("test-worker")
    stop, started = threading.Event(), threading.Event()
    preempted: list[str] = []

    def background() -> str:
        started.set()
        return "preempted" if stop.wait(5) else "ran out"

    bg = worker.submit(background, priority=lambda: (BACKGROUND, 0),
                       preempt=lambda: (preempted.append("bg"), stop.set()))
    assert started.wait(5)
    worker.submit(lambda: None, priority=lambda: (BACKGROUND, 1), preempt=lambda: preempted.append("bg2"))
    assert preempted == []  # another background job does not preempt it
    urgent = worker.submit(lambda: "urgent")
    assert bg.result(timeout=5) == "preempted" and preempted == ["bg"]
    assert urgent.result(timeout=5) == "urgent"

    stop.clear()
    started.clear()
    running_urgent = worker.submit(background, preempt=lambda: preempted.append("urgent"))
    assert started.wait(5)
    worker.submit(lambda: None)
    threading.Timer(0.1, stop.set).start()
    assert running_urgent.result(timeout=5) == "preempted"  # ended by the timer, never preempted
    assert preempted == ["bg"]
    worker.shutdown()
