"""The model worker thread's queue: urgent jobs first, FIFO within a priority, live priorities, and
background work held back while urgent work kept the worker busy."""

from __future__ import annotations

import math
import threading
import time

import pytest

from dsi.services.model.worker import BACKGROUND, CANCELLED, URGENT, PriorityWorker, UrgentLoad

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


def test_urgent_load_is_a_moving_average_of_urgent_running_time() -> None:
    load = UrgentLoad(tau_s=1.0, now=0.0)
    assert load.level(5.0) == 0.0
    load.set(True, 0.0)
    assert load.level(1.0) == pytest.approx(1 - math.exp(-1))
    load.set(False, 1.0)
    level = 1 - math.exp(-1)
    assert load.level(2.0) == pytest.approx(level * math.exp(-1))
    # Idle from t = 1: the level falls below 0.2 exactly when predicted.
    wait = load.seconds_until_below(0.2, 1.0)
    assert wait == pytest.approx(math.log(level / 0.2), abs=1e-3)
    assert load.level(1.0 + wait) < 0.2 <= load.level(1.0 + wait - 0.01)
    assert load.seconds_until_below(0.9, 1.0) == 0.0


def _busy(worker: PriorityWorker, seconds: float) -> None:
    """Keep the worker on urgent jobs for about ``seconds``."""
    worker.submit(time.sleep, seconds).result(timeout=5)


def test_background_jobs_wait_while_urgent_work_kept_the_worker_busy() -> None:
    worker = PriorityWorker("test-worker", background_limit=0.5, load_tau_s=0.1)
    _busy(worker, 0.3)  # urgent share ~0.95
    assert worker.load.level(time.perf_counter()) > 0.8
    submitted = time.perf_counter()
    started: list[float] = []
    bg = worker.submit(lambda: started.append(time.perf_counter()), priority=lambda: (BACKGROUND, 0))
    bg.result(timeout=5)
    # Held until the share decayed below 0.5: about tau x ln(0.95 / 0.5) = 64 ms after it came.
    assert started[0] - submitted >= 0.03
    assert worker.background_held_s >= 0.03
    assert worker.load.level(started[0]) < 0.5 + 0.05
    worker.shutdown()


def test_a_held_background_job_runs_at_once_when_it_becomes_urgent() -> None:
    worker = PriorityWorker("test-worker", background_limit=0.0, load_tau_s=0.1)  # 0: never background
    _busy(worker, 0.05)
    priority = {"now": BACKGROUND}
    job = worker.submit(lambda: "ran", priority=lambda: (priority["now"], 0))
    with pytest.raises(TimeoutError):
        job.result(timeout=0.3)  # held: the limit never lets background work start
    priority["now"] = URGENT
    worker.reprioritized()
    assert job.result(timeout=1) == "ran"
    worker.shutdown()


def test_without_a_limit_background_jobs_start_whenever_the_worker_is_free() -> None:
    worker = PriorityWorker("test-worker", load_tau_s=0.1)
    _busy(worker, 0.3)
    submitted = time.perf_counter()
    ran = worker.submit(time.perf_counter, priority=lambda: (BACKGROUND, 0)).result(timeout=5)
    assert ran - submitted < 0.02
    assert worker.background_held_s == 0.0
    worker.shutdown()


def test_cancelled_jobs_leave_the_queue_first_and_are_never_held() -> None:
    """Dead jobs (priority CANCELLED) go before urgent work, even under a limit that holds background
    work, so they cannot pile up behind a stream of urgent jobs."""
    worker = PriorityWorker("test-worker", background_limit=0.0, load_tau_s=0.1)
    gate = threading.Event()
    order: list[str] = []
    blocker = worker.submit(gate.wait)
    dead = {"now": BACKGROUND}
    futures = [
        worker.submit(order.append, "urgent", priority=lambda: (URGENT, 0)),
        worker.submit(order.append, "dead", priority=lambda: (dead["now"], 5)),
    ]
    dead["now"] = CANCELLED
    gate.set()
    blocker.result(timeout=5)
    for f in futures:
        f.result(timeout=5)
    worker.shutdown()
    assert order == ["dead", "urgent"]
