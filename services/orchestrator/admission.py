"""Admission of Generate requests: at most ``max_active`` run at once, at most ``max_queued`` wait
(first come, first served) for at most ``max_wait_s``; beyond that a request is refused at once with
RESOURCE_EXHAUSTED and a retry hint, so overload never turns into silent, unbounded waiting."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator

from dsi.services.runtime.errors import ResourceExhausted


class Busy(ResourceExhausted):
    """No capacity for the request now; ``retry_after_s`` is a hint for the caller."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Admission:
    def __init__(self, max_active: int, max_queued: int, max_wait_s: float) -> None:
        self.max_active = max_active
        self.max_queued = max_queued
        self.max_wait_s = max_wait_s
        self.active = 0
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._recent_s = 1.0  # smoothed request duration, for the retry hint

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def _retry_after_s(self) -> float:
        return round(max(0.1, self._recent_s * (1 + self.queued) / max(1, self.max_active)), 1)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the ``max_active`` slots for the duration of the block."""
        if self.active < self.max_active and not self._waiting:
            self.active += 1
        else:
            await self._wait_for_slot()
        started = time.monotonic()
        try:
            yield
        finally:
            self._recent_s = 0.8 * self._recent_s + 0.2 * (time.monotonic() - started)
            self._release()

    async def _wait_for_slot(self) -> None:
        if len(self._waiting) >= self.max_queued:
            raise Busy(
                f"server busy: {self.active} requests running and {self.queued} waiting (the most it queues); "
                f"retry in about {self._retry_after_s()} s",
                self._retry_after_s(),
            )
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            await asyncio.wait_for(asyncio.shield(turn), self.max_wait_s)
        except BaseException as exc:
            if turn.done() and not turn.cancelled():
                self._release()  # handed a slot just as it gave up: pass it on
            else:
                turn.cancel()
                with contextlib.suppress(ValueError):
                    self._waiting.remove(turn)
            if isinstance(exc, asyncio.TimeoutError):
                raise Busy(
                    f"server busy: waited {self.max_wait_s:g} s for one of {self.max_active} request slots; "
                    f"retry in about {self._retry_after_s()} s",
                    self._retry_after_s(),
                ) from None
            raise

    def _release(self) -> None:
        self.active -= 1
        while self._waiting and self.active < self.max_active:
            turn = self._waiting.popleft()
            if not turn.done():
                self.active += 1  # the slot passes to the waiter directly: nobody can jump the queue
                turn.set_result(None)
