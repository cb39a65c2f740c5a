"""The scheduler's DrafterClient over gRPC: one DraftFlow stream per drafter run, with credits sent
as the scheduler grants them, cancelled for real."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc

from dsi.services.orchestrator.scheduler import Draft
from dsi.services.runtime.params import Sampling
from dsi.services.runtime.validation import sampling_to_pb
from dsi.v1 import common_pb2, drafter_pb2, drafter_pb2_grpc


class DrafterStalled(Exception):
    """The drafter sent nothing for too long while it had credit (hung, or far too slow)."""


class GrpcDraftStream:
    """One DraftFlow call. A watchdog abandons it (a real cancel, then ``DrafterStalled``) when the
    drafter sends nothing for ``stall_s`` while it owes an urgent draft: a hung drafter costs a
    bounded wait, after which the request goes on target-only, in every mode. Background drafts
    (past ``set_urgent``'s mark) may wait indefinitely: the drafter makes them only when it has
    nothing urgent to do, so their absence under load is no stall."""

    def __init__(
        self,
        stub: drafter_pb2_grpc.DrafterServiceStub,
        start: drafter_pb2.DraftRequest,
        timeout: float,
        stall_s: float = 0.0,
        on_gap: Callable[[float], None] | None = None,
    ) -> None:
        self._on_gap = on_gap  # told the time between two drafts the stream had credit for
        self._last: float | None = None  # when the last draft arrived, if the stream had credit after it
        self._requests: asyncio.Queue[drafter_pb2.DraftFlowRequest | None] = asyncio.Queue()
        self._requests.put_nowait(drafter_pb2.DraftFlowRequest(start=start))
        self.call = stub.DraftFlow(self._outgoing(), timeout=timeout)
        self._loop = asyncio.get_running_loop()
        self._credit = start.max_tokens
        self._length = len(start.token_ids)  # the sequence the next draft extends
        self._urgent_until = 0  # the last urgency mark sent (0: every draft urgent)
        # The last draft, or the grant or urgency mark that ended a wait for credit or for urgency.
        self._progress = self._loop.time()
        self._stalled = False
        self._watchdog = asyncio.create_task(self._watch(stall_s)) if stall_s > 0 else None

    async def _watch(self, stall_s: float) -> None:
        while True:
            await asyncio.sleep(stall_s / 4)
            if self._owes_urgent() and self._loop.time() - self._progress > stall_s:
                self._stalled = True
                self.call.cancel()
                return

    def _owes_urgent(self) -> bool:
        """Credit left, and the next draft is urgent."""
        return self._credit > 0 and (self._urgent_until == 0 or self._length + 1 <= self._urgent_until)

    async def _outgoing(self) -> AsyncIterator[drafter_pb2.DraftFlowRequest]:
        while (msg := await self._requests.get()) is not None:
            yield msg

    async def __aiter__(self) -> AsyncIterator[Draft]:  # type: ignore[override]
        try:
            async for msg in self.call:
                now = self._loop.time()
                if self._last is not None and self._on_gap is not None:
                    self._on_gap(now - self._last)
                self._credit -= 1
                self._length += 1
                self._progress = now
                # The next gap measures the drafter only if it had credit for the next draft (background
                # drafts count too: under load they wait for others' urgent ones, the drafter's real pace).
                self._last = now if self._credit > 0 else None
                probs = (list(msg.probs.token_ids), list(msg.probs.probs)) if msg.HasField("probs") else None
                yield Draft(msg.token_id, probs)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            cancelling = task.cancelling() if task is not None and hasattr(task, "cancelling") else 0
            if self._stalled and not cancelling:  # the watchdog's cancel, not the caller's
                raise DrafterStalled("the drafter sent no draft for too long") from None
            raise
        except grpc.aio.AioRpcError as exc:
            # A stream serves a whole epoch, which may outlast the per-call deadline: that ends this
            # stream (the scheduler opens a new one from the drafts so far), not the drafter.
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
        finally:
            # Once the call is over, cancel() no longer stops the request generator: end it here.
            self._requests.put_nowait(None)
            if self._watchdog is not None:
                self._watchdog.cancel()

    def grant(self, n: int) -> None:
        self._last = None  # the drafter may have waited for this credit
        if not self._owes_urgent():
            self._progress = self._loop.time()  # it was waiting for credit or urgency, not stalled
        self._credit += n
        self._requests.put_nowait(drafter_pb2.DraftFlowRequest(grant=n))

    def set_urgent(self, until: int) -> None:
        if until != self._urgent_until:
            if not self._owes_urgent():
                self._progress = self._loop.time()  # it may have been waiting as background work
            self._urgent_until = until
            self._requests.put_nowait(drafter_pb2.DraftFlowRequest(urgent_until=until))

    def end_grants(self) -> None:
        self._requests.put_nowait(None)  # half-close: the stream ends when its credit is used

    def cancel(self) -> None:
        # Breaking out of `async for` does not cancel a grpc.aio stream; this does.
        self.call.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()


class GrpcDrafterClient:
    def __init__(
        self,
        stub: drafter_pb2_grpc.DrafterServiceStub,
        sampling: common_pb2.SamplingParams,
        request_id: str,
        deadline_s: float,
        vocab_limit: int = 0,
        stall_s: float = 0.0,
        order: int = 0,
        on_gap: Callable[[float], None] | None = None,
    ) -> None:
        """``vocab_limit``: drafts are ids below it (the targets' number of logits, so a drafter whose
        embedding is padded beyond them never proposes an id they cannot score); 0 = any."""
        self.stub = stub
        self.sampling = sampling
        self.request_id = request_id
        self.deadline_s = deadline_s
        self.vocab_limit = vocab_limit
        self.stall_s = stall_s  # abandon a stream that sends nothing this long while it has credit (0 = never)
        self.order = order  # the request's arrival order: older requests' drafts go first
        self.on_gap = on_gap

    def open(self, session_id: str, prefix: list[int], max_tokens: int, return_probs: bool) -> GrpcDraftStream:
        request = drafter_pb2.DraftRequest(
            request_id=self.request_id,
            session_id=session_id,
            token_ids=prefix,
            max_tokens=max_tokens,
            sampling=self.sampling,
            return_probs=return_probs,
            vocab_limit=self.vocab_limit,
            order=self.order,
        )
        return GrpcDraftStream(self.stub, request, self.deadline_s, self.stall_s, self.on_gap)


class Drafter:
    """The drafter service as the orchestrator uses it: a DraftFlow client per request, and the
    release of a finished request's session."""

    def __init__(
        self, stub: drafter_pb2_grpc.DrafterServiceStub, deadline_s: float, vocab_limit: int = 0, stall_s: float = 0.0,
        on_gap: Callable[[float], None] | None = None,
    ) -> None:
        self.on_gap = on_gap  # the time between consecutive drafts (automatic lookahead)
        self.stub = stub
        self.deadline_s = deadline_s
        self.vocab_limit = vocab_limit
        self.stall_s = stall_s

    def client(self, sampling: Sampling, request_id: str, order: int) -> GrpcDrafterClient:
        return GrpcDrafterClient(self.stub, sampling_to_pb(sampling), request_id, self.deadline_s,
                                 vocab_limit=self.vocab_limit, stall_s=self.stall_s, order=order, on_gap=self.on_gap)

    async def release(self, session_id: str) -> None:
        """Best effort: a drafter that does not answer drops the session at its time-to-live."""
        try:
            await self.stub.Release(drafter_pb2.DrafterReleaseRequest(session_id=session_id), timeout=5.0)
        except grpc.aio.AioRpcError:
            pass
