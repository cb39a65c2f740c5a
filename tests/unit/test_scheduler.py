"""The DSI scheduler against in-memory fakes on a virtual clock."""

from __future__ import annotations

import asyncio

import pytest

from dsi.services.orchestrator.scheduler import CommittedToken, Scheduler, SchedulerConfig, Source
from tests.unit.fakes import FakeDrafter, FakeTarget, reference, run_virtual

pytestmark = pytest.mark.unit

PROMPT = [1, 2, 3]


def generate(mode: str, target: FakeTarget, drafter: FakeDrafter | None, n: int = 40, lookahead: int = 4,
             sp: int = 0, stop_at: int | None = None):
    out: list[CommittedToken] = []

    async def main():
        sched = Scheduler(target, drafter, SchedulerConfig(mode=mode, lookahead=lookahead, sp_degree=sp,
                                                           max_new_tokens=n), "s1")
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        def on_commit(tok: CommittedToken) -> bool:
            out.append(tok)
            return stop_at is not None and tok.token_id == stop_at

        stats = await sched.run(PROMPT, on_commit)
        return stats, loop.time() - t0

    stats, elapsed = run_virtual(main)
    return [t.token_id for t in out], out, stats, elapsed


@pytest.mark.parametrize("mode", ["dsi", "si", "nonsi"])
@pytest.mark.parametrize("acceptance", [0.0, 0.5, 0.9, 1.0])
def test_output_equals_target(mode: str, acceptance: float) -> None:
    ids, _, stats, _ = generate(mode, FakeTarget(instances=3), FakeDrafter(acceptance=acceptance))
    assert ids == reference(PROMPT, 40)
    assert stats.new_tokens == 40


def test_positions_are_consecutive_and_sources_match_drafts() -> None:
    ids, toks, stats, _ = generate("dsi", FakeTarget(instances=3), FakeDrafter(acceptance=0.7))
    assert [t.position for t in toks] == list(range(len(PROMPT), len(PROMPT) + 40))
    assert sum(t.source is Source.DRAFT for t in toks) == stats.tokens_from_drafts > 0
    assert stats.drafts_accepted >= stats.tokens_from_drafts


def test_stale_windows_are_cancelled_on_rejection() -> None:
    target = FakeTarget(instances=4, latency=1.0)
    drafter = FakeDrafter(latency=0.2, acceptance=0.5)
    _, _, stats, _ = generate("dsi", target, drafter, n=60)
    assert stats.epochs > 1
    assert stats.windows_cancelled > 0
    # Every dispatched window either completed or was cancelled; cancellations reached the target.
    assert target.cancelled == stats.windows_cancelled
    assert target.completed + target.cancelled == stats.windows_dispatched
    assert drafter.cancels > 0
    assert stats.max_windows_in_flight > 1


def test_out_of_order_results_are_applied_in_order() -> None:
    class Jittery(FakeTarget):
        async def verify(self, window):  # first windows of an epoch take longest
            self.latency = 1.0 if window.rank == 0 else 0.3
            return await super().verify(window)

    ids, _, _, _ = generate("dsi", Jittery(instances=4), FakeDrafter(latency=0.01, acceptance=0.9), n=50)
    assert ids == reference(PROMPT, 50)


def test_stop_callback_ends_generation() -> None:
    ref = reference(PROMPT, 40)
    stop = ref[10]
    ids, _, _, _ = generate("dsi", FakeTarget(instances=2), FakeDrafter(acceptance=0.9), stop_at=stop)
    assert ids == ref[: ref.index(stop) + 1]


def test_drafter_failure_continues_target_only() -> None:
    drafter = FakeDrafter(acceptance=0.9, fail_after=5)
    ids, _, stats, _ = generate("dsi", FakeTarget(instances=2), drafter)
    assert ids == reference(PROMPT, 40)
    assert stats.drafter_failed


def test_backpressure_limits_drafts_ahead() -> None:
    # A very fast drafter and a slow target: drafts never run more than SP x L ahead of commits.
    target = FakeTarget(instances=2, latency=1.0)
    drafter = FakeDrafter(latency=0.001, acceptance=1.0)
    _, _, stats, _ = generate("dsi", target, drafter, n=40, lookahead=3)
    assert stats.drafts_proposed <= 40 + (2 + 1) * 3 + 3


def test_one_drafter_stream_per_epoch_with_credit_grants() -> None:
    # Every draft accepted: one epoch, one stream, kept going by grants (never reopened), and the
    # drafter is never granted more than (SP + 1) x L drafts beyond the decided position.
    target = FakeTarget(instances=2, latency=1.0)
    drafter = FakeDrafter(latency=0.05, acceptance=1.0)
    ids, _, stats, _ = generate("dsi", target, drafter, n=60, lookahead=3)
    assert ids == reference(PROMPT, 60)
    assert stats.epochs == 1
    assert drafter.opened == 1
    (stream,) = drafter.streams
    assert len(stream.grants) > 3
    assert stream.grants[0] == (2 + 1) * 3
    assert sum(stream.grants) <= 60
    assert stats.drafts_proposed <= sum(stream.grants)


def test_rejections_open_one_stream_per_epoch() -> None:
    drafter = FakeDrafter(latency=0.05, acceptance=0.6)
    _, _, stats, _ = generate("dsi", FakeTarget(instances=3, latency=1.0), drafter, n=60, lookahead=3)
    assert stats.epochs > 3
    assert drafter.opened <= stats.epochs
    assert all(s.cancelled or s.credit == 0 for s in drafter.streams)


@pytest.mark.parametrize("c", [0.05, 0.1, 0.2, 0.5])
@pytest.mark.parametrize("acceptance", [0.0, 0.3, 0.6, 0.8, 0.95])
def test_dsi_never_slower_than_si_or_nonsi(c: float, acceptance: float) -> None:
    lookahead = 4
    targets = max(2, int(1 / (c * lookahead)) + 2)
    times = {}
    for mode in ("dsi", "si", "nonsi"):
        _, _, _, elapsed = generate(mode, FakeTarget(instances=targets, latency=1.0),
                                    FakeDrafter(latency=c, acceptance=acceptance), n=80, lookahead=lookahead)
        times[mode] = elapsed
    # Allow one target latency of slack for the pipeline's start and end.
    assert times["dsi"] <= times["nonsi"] + 1.0 + 1e-9, times
    assert times["dsi"] <= times["si"] + 1.0 + 1e-9, times


def test_dsi_is_faster_than_si_with_a_good_drafter() -> None:
    times = {}
    for mode in ("dsi", "si"):
        _, _, _, elapsed = generate(mode, FakeTarget(instances=4, latency=1.0),
                                    FakeDrafter(latency=0.1, acceptance=0.8), n=100, lookahead=4)
        times[mode] = elapsed
    assert times["dsi"] < 0.85 * times["si"], times


def _run_limited(mode: str, drafter: FakeDrafter, n: int, draft_limit: int = 0):
    target = FakeTarget(instances=3)

    async def main():
        sched = Scheduler(target, drafter, SchedulerConfig(mode=mode, lookahead=4, max_new_tokens=n,
                                                           draft_sequence_length=draft_limit), "s1")
        out: list[int] = []
        await sched.run(PROMPT, lambda tok: out.append(tok.token_id) or False)
        return out

    return run_virtual(main), target


@pytest.mark.parametrize("mode", ["dsi", "si"])
@pytest.mark.parametrize("n", [1, 2, 5, 17])
def test_windows_read_no_more_positions_than_plain_decoding(mode: str, n: int) -> None:
    """Plain decoding of n tokens reads prompt + n - 1 positions; no window may read more, even when
    every draft is accepted (a draft at the last position would put the bonus position past the end)."""
    out, target = _run_limited(mode, FakeDrafter(acceptance=1.0), n)
    assert out == reference(PROMPT, n)
    assert max(len(w.token_ids) for w in target.calls) <= len(PROMPT) + n - 1


@pytest.mark.parametrize("mode", ["dsi", "si"])
def test_no_draft_is_asked_past_the_drafters_context(mode: str) -> None:
    drafter = FakeDrafter(acceptance=1.0)
    limit = len(PROMPT) + 10
    out, _ = _run_limited(mode, drafter, 30, draft_limit=limit)
    assert out == reference(PROMPT, 30)  # target-only once the drafter's context is full
    assert drafter.opened > 0
    for stream in drafter.streams:
        assert len(stream.prefix) + sum(stream.grants) <= limit


class _SlowCancelTarget(FakeTarget):
    """Cancelled windows take a while to wind down (the remote cancel's round trip); the first such
    cancel also cancels the request itself, so the request's cancel lands while the scheduler waits
    for its windows at an epoch boundary."""

    run_task: asyncio.Task | None = None

    async def verify(self, window):  # type: ignore[no-untyped-def]
        try:
            return await super().verify(window)
        except asyncio.CancelledError:
            if self.run_task is not None and not self.run_task.done():
                self.run_task.cancel()
                self.run_task = None
            await asyncio.sleep(0.05)
            raise


def test_a_cancel_at_an_epoch_boundary_stops_the_request() -> None:
    target = _SlowCancelTarget(instances=4, latency=1.0)
    drafter = FakeDrafter(latency=0.1, acceptance=0.5)
    out: list[int] = []

    async def main() -> tuple[int, int]:
        sched = Scheduler(target, drafter, SchedulerConfig(mode="dsi", lookahead=3, max_new_tokens=200), "s1")
        task = asyncio.ensure_future(sched.run(PROMPT, lambda tok: out.append(tok.token_id) or False))
        target.run_task = task
        with pytest.raises(asyncio.CancelledError):
            await task
        epochs, calls = sched.stats.epochs, len(target.calls)
        await asyncio.sleep(10.0)  # nothing of the request may run after its cancel
        assert len(target.calls) == calls and sched.stats.epochs == epochs
        return epochs, len(out)

    epochs, committed = run_virtual(main)
    assert target.run_task is None  # the cancel did land while an epoch was closing
    assert epochs <= 2 and committed < 200


def test_wasted_target_time_counts_only_time_holding_a_target() -> None:
    """Four requests share two target instances, so windows queue; a window cancelled while queued
    costs no target time, and the request's forwards are the windows that got an instance. The
    target reports capacity it does not have (as when requests race for the last idle instance), so
    speculative windows do queue."""
    target = FakeTarget(instances=2, latency=1.0)
    target.spare = lambda: 2  # type: ignore[method-assign]
    drafter = FakeDrafter(latency=0.1, acceptance=0.5)

    async def main():
        scheds = [Scheduler(target, drafter, SchedulerConfig(mode="dsi", lookahead=3, sp_degree=2, max_new_tokens=30),
                            f"s{i}", request_seq=i) for i in range(4)]
        await asyncio.gather(*(s.run(PROMPT, lambda tok: False) for s in scheds))
        return [s.stats for s in scheds]

    stats = run_virtual(main)
    for i, s in enumerate(stats):
        sid = f"s{i}"
        assert s.target_forwards == target.started[sid] < s.windows_dispatched  # some never got a target
        assert s.wasted_target_s == pytest.approx(target.held_s[sid] - 1.0 * s.windows_applied)
    assert sum(s.critical_queue_wait_s for s in stats) > 0


def test_windows_are_promoted_as_the_ones_before_them_are_applied() -> None:
    target = FakeTarget(instances=3, latency=1.0)
    generate("dsi", target, FakeDrafter(latency=0.1, acceptance=1.0), n=30, lookahead=2)
    assert target.promotions
    for request, rank in target.promotions:
        assert 0 <= rank < request.rank  # only ever moved up
    assert any(rank == 0 for _, rank in target.promotions)


def test_with_idle_targets_dsi_speculates_from_window_zero_on() -> None:
    target = FakeTarget(instances=4, latency=1.0)
    out, _, stats, _ = generate("dsi", target, FakeDrafter(latency=0.1, acceptance=0.8), n=40, lookahead=3)
    assert out == reference(PROMPT, 40)
    first = target.calls[0]
    assert len(first.token_ids) == first.first_position == len(PROMPT)  # window 0: no drafts, at once
    assert stats.max_windows_in_flight > 1


def test_when_no_target_is_spare_dsi_sends_only_full_critical_windows() -> None:
    """Under load (no idle target nobody waits for), no zero-draft or short window and no
    speculative window goes out: each request keeps one full window in flight (pipelined SI), and
    its output is unchanged."""
    target = FakeTarget(instances=4, latency=1.0)
    target.spare = lambda: 0  # type: ignore[method-assign]
    lookahead, n = 3, 40
    out, _, stats, _ = generate("dsi", target, FakeDrafter(latency=0.1, acceptance=0.8), n=n, lookahead=lookahead)
    assert out == reference(PROMPT, n)
    assert stats.max_windows_in_flight == 1
    drafts = [len(w.token_ids) - w.first_position for w in target.calls]
    budget_end = len(PROMPT) + n - 1  # the last position is never drafted
    for w, d in zip(target.calls, drafts, strict=True):
        assert d == lookahead or len(w.token_ids) == budget_end, drafts


class _RetriedOnceTarget(FakeTarget):
    """Every window is retried once on its way (as the pool records when an instance fails)."""

    async def verify(self, window):  # type: ignore[no-untyped-def]
        window.timing.retries += 1
        return await super().verify(window)


@pytest.mark.parametrize("mode", ["dsi", "si", "nonsi"])
def test_retries_count_every_window_also_those_cancelled(mode: str) -> None:
    target = _RetriedOnceTarget(instances=4, latency=1.0)
    out, _, stats, _ = generate(mode, target, FakeDrafter(latency=0.1, acceptance=0.5), n=30, lookahead=3)
    assert out == reference(PROMPT, 30)
    assert stats.retries == len(target.calls) == stats.windows_dispatched
    if mode == "dsi":
        assert stats.windows_cancelled > 0  # some of those retried windows were never applied


class _SpeculationFails(FakeTarget):
    """Every speculative window fails at once (as a window does whose retries are used up)."""

    async def verify(self, window):  # type: ignore[no-untyped-def]
        if window.rank > 0:
            raise ConnectionError("speculative window failed")
        return await super().verify(window)


def test_a_failed_window_fails_the_request_only_once_it_is_the_critical_one() -> None:
    """A drafter whose drafts are always rejected: each epoch ends at its critical window, so the
    speculative windows that fail never become critical; the request completes, exactly."""
    ids, _, stats, _ = generate("dsi", _SpeculationFails(instances=4), FakeDrafter(latency=0.05, acceptance=0.0))
    assert ids == reference(PROMPT, 40)
    assert stats.windows_dispatched > stats.windows_applied  # speculative windows were sent (and failed)


def test_a_critical_window_that_fails_fails_the_request() -> None:
    class CriticalFails(FakeTarget):
        async def verify(self, window):  # type: ignore[no-untyped-def]
            if window.first_position >= len(PROMPT) + 5:
                raise ConnectionError("target failed")
            return await super().verify(window)

    with pytest.raises(ConnectionError):
        generate("dsi", CriticalFails(instances=4), FakeDrafter(latency=0.05, acceptance=0.9))
