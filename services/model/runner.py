"""Runs a model's forward passes on one worker thread per device, with cancellation between decoder
layers, per-session KV caches, and optional latency emulation.

Cancellation: the asyncio caller sets the job's stop flag when its call is cancelled; a forward
pre-hook on every decoder layer checks it and raises ``ForwardCancelled``. The session cache is then
cut back, layer by layer, to exactly its state before the call (``kv_cache``: every attention layer,
sliding-window ones included, keeps its full history so that this is always possible; a cache with
recurrent state is started over instead), so the next call on the session sees a consistent cache.

Latency emulation pads a job (its forward pass and choosing tokens from the logits, the work a
device does for one step) to at least the configured wall time by sleeping, spread over the layers
and interruptible by the stop flag, so parallel instances on a small machine overlap as they would
on separate devices and cancellation still lands mid-forward.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from dsi.services.model.emulation import Emulation
from dsi.services.model.kv_cache import crop_kv_cache, new_kv_cache
from dsi.services.model.loading import LoadedModel
from dsi.services.model.session_cache import CachedSession, SessionCache, common_prefix_len
from dsi.services.model.worker import CANCELLED, URGENT, Priority, PriorityWorker
from dsi.services.runtime.model_errors import DeviceOutOfMemory, ModelError, PrefixNotHeld

log = logging.getLogger(__name__)
T = TypeVar("T")


class ForwardCancelled(Exception):
    """The call was cancelled; its forward pass was stopped or never started."""


@dataclass(frozen=True)
class Chunking:
    """Fixed-shape forwards, for output that does not depend on which window computes a position.

    In reduced precision a matrix product may round differently for a different number of rows, so a
    position's logits would depend on how many tokens its forward carried (a 1-token non-SI step or
    an (L + 1)-token window) and on how its prefix was cached. Here the sequence is cut at fixed
    absolute positions: the prompt ``[0, origin)`` is one forward (keeping its last row's logits),
    then every ``size`` tokens is one forward of exactly ``size`` rows (the last one padded, its
    padding cut from the cache after), always recomputed whole from its start. Each position's
    logits then come from the same computation over the same cached prefix, whoever computes it; a
    row never depends on later rows (causal mask), so drafts or padding after it change nothing.
    """

    origin: int
    size: int

    def start_of(self, index: int) -> int:
        """Where the chunk holding token ``index`` starts."""
        if index < self.origin:
            return 0
        return self.origin + (index - self.origin) // self.size * self.size

    def pieces(self, start: int, end: int, limit: int) -> list[tuple[int, int, int]]:
        """(first token, one past the last token incl. padding, logit rows kept) of each forward
        computing tokens start .. end - 1 from the chunk boundary ``start``. Padding never runs past
        ``limit`` positions (the model's context): the last chunk there is shorter, but always equally
        short, so its shape still depends only on where it starts."""
        out = []
        a = start
        while a < end:
            if a < self.origin:
                out.append((a, self.origin, 1))
                a = self.origin
            else:
                b = min(a + self.size, max(limit, end))
                out.append((a, b, b - a))
                a = b
        return out


@dataclass
class RunnerCounters:
    """Counters since start (mutated by the worker thread and the event loop; ints under the GIL)."""

    calls: int = 0
    cancelled: int = 0
    cancelled_mid_forward: int = 0
    cancelled_queued: int = 0
    forwards_completed: int = 0
    layers_run: int = 0
    cache_hit_tokens: int = 0
    computed_tokens: int = 0
    cancelled_compute_s: float = 0.0
    preempted: int = 0  # background jobs stopped for urgent ones (not cancels: they run again)
    cache_fill_tokens: int = 0


@dataclass
class Job:
    """One unit of work on the worker thread."""

    cancel: threading.Event = field(default_factory=threading.Event)
    # Queued jobs run lowest first: (URGENT, then BACKGROUND: speculative drafts; then the caller's
    # order), FIFO within one; read when the worker picks its next job, so it may change meanwhile.
    priority: Priority = (URGENT, 0)
    # Set (with ``cancel``) when an urgent job preempted this background one: its caller runs it again.
    preempted: bool = False
    started: bool = False
    pad_s: float = 0.0
    t0: float = 0.0
    compute_s: float = 0.0
    queue_s: float = 0.0


# Timed waits overshoot by 0.1-0.2 ms on a VM; the last part of an emulated latency is spun instead
# (yielding the GIL), as a CUDA stream synchronize spins, so the padding ends on time.
_SPIN_S = 0.0003


def _sleep_until(deadline: float, cancel: threading.Event) -> bool:
    """Wait until the perf_counter deadline; True as soon as ``cancel`` is set."""
    rest = deadline - time.perf_counter() - _SPIN_S
    if rest > 0 and cancel.wait(rest):
        return True
    while time.perf_counter() < deadline:
        if cancel.is_set():
            return True
        time.sleep(0)
    return False


def find_decoder_layers(model: nn.Module, num_layers: int) -> list[nn.Module]:
    """The decoder blocks of a causal LM: the ModuleList with num_hidden_layers entries (else the longest)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    exact = [m for m in lists if len(m) == num_layers]
    chosen = exact[0] if exact else max(lists, key=len, default=None)
    if chosen is None:
        raise ValueError("could not find the decoder layers of this model")
    return list(chosen)


class ModelRunner:
    """Owns a loaded model, its session caches and its worker thread."""

    def __init__(
        self,
        loaded: LoadedModel,
        token_budget: int = 1 << 20,
        ttl_s: float = 600.0,
        emulation: Emulation | None = None,
        max_sequence_tokens: int = 0,
        background_limit: float = 1.0,
    ) -> None:
        """``background_limit``: background jobs (speculative drafts) start only while the share of
        recent time spent on urgent jobs is below it (``PriorityWorker``; 1.0: whenever none waits)."""
        self.loaded = loaded
        # The longest sequence a call may carry: the service's limit, or the model's positions if fewer.
        limits = [n for n in (max_sequence_tokens, loaded.max_positions) if n > 0]
        self.max_sequence_length = min(limits) if limits else 1 << 30
        self.emulation = emulation or Emulation()
        self.counters = RunnerCounters()
        self.sessions = SessionCache(
            new_kv=lambda: new_kv_cache(loaded.model.config), token_budget=token_budget, ttl_s=ttl_s
        )
        self._executor = PriorityWorker("model-worker", background_limit)
        self._job: Job | None = None
        params = inspect.signature(loaded.model.forward).parameters
        # Architectures without logits_to_keep compute logits for every new token instead.
        self._supports_logits_to_keep = "logits_to_keep" in params
        # transformers >= 5.2x names the KV cache argument `cache` (`past_key_values` is deprecated).
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._layers = find_decoder_layers(loaded.model, loaded.num_layers)
        for index, layer in enumerate(self._layers):
            layer.register_forward_pre_hook(self._make_hook(index))

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    # -- event-loop side -------------------------------------------------------------------------

    async def run(self, fn: Callable[[Job], T]) -> T:
        """Run ``fn(job)`` on the worker thread; cancelling the awaiting task stops it."""
        job = Job()
        submitted = time.perf_counter()

        def work() -> T:
            job.queue_s = time.perf_counter() - submitted
            return self._run_job(job, fn)

        cfut: Future[T] = self._executor.submit(work)
        afut = asyncio.wrap_future(cfut)
        # The worker always runs the job (it returns at once if the flag is already set), so the
        # result must be consumed even when nobody awaits it any more.
        afut.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            return await asyncio.shield(afut)
        except asyncio.CancelledError:
            job.cancel.set()
            raise

    def submit(self, job: Job, fn: Callable[[Job], T], on_done: Callable[[Future[T]], None]) -> None:
        """Queue ``fn(job)`` on the worker thread without an event-loop round trip; ``on_done`` gets
        its future, on the worker thread, and may submit the next job at once (the queue is FIFO within
        a ``job.priority``, so chains of jobs from several callers interleave fairly, urgent ones
        first; a running background job is preempted, ``job.preempted`` and ``job.cancel`` set, when
        an urgent one comes). Setting ``job.cancel`` stops it."""
        submitted = time.perf_counter()

        def work() -> T:
            job.queue_s = time.perf_counter() - submitted
            return self._run_job(job, fn)

        def preempt() -> None:
            job.preempted = True
            job.cancel.set()

        def priority() -> Priority:
            # A job cancelled while queued (its flow closed) ends at once: it leaves the queue first.
            # Left at its BACKGROUND rank, such jobs would pile up behind urgent work (every pick
            # scans the queue), e.g. the queued speculative step of every DSI epoch a rejection ended.
            return (CANCELLED, 0) if job.cancel.is_set() and not job.started else job.priority

        self._executor.submit(work, priority=priority, preempt=preempt).add_done_callback(on_done)

    def reprioritized(self) -> None:
        """A queued job's ``priority`` changed: the worker picks again (a held background job may now
        be urgent)."""
        self._executor.reprioritized()

    @property
    def background_held_s(self) -> float:
        """Seconds the worker stayed idle holding background jobs back under load."""
        return self._executor.background_held_s

    @property
    def urgent_load(self) -> float:
        """The share of recent time the worker spent on urgent jobs (``UrgentLoad``)."""
        return self._executor.load.level(time.perf_counter())

    async def release(self, session_id: str) -> bool:
        return await asyncio.wrap_future(self._executor.submit(self.sessions.drop, session_id))

    # -- worker side -----------------------------------------------------------------------------

    def _run_job(self, job: Job, fn: Callable[[Job], T]) -> T:
        if job.cancel.is_set():
            if job.preempted:
                self.counters.preempted += 1
            else:
                self.counters.cancelled_queued += 1
            raise ForwardCancelled("cancelled while queued")
        job.started = True
        self._job = job
        try:
            with torch.inference_mode():
                result = fn(job)
            self._pad_rest(job)
            return result
        except ForwardCancelled:
            if job.preempted:
                self.counters.preempted += 1
            else:
                self.counters.cancelled_mid_forward += 1
            self.counters.cancelled_compute_s += job.compute_s
            raise
        finally:
            self._job = None

    def _pad_rest(self, job: Job) -> None:
        """Latency emulation: sleep out the rest of the job's padded latency. The job (its forward and
        choosing tokens from the logits, which a device does as part of the step) then took at least
        the emulated latency; the session cache is already valid, so a cancel here only skips the wait."""
        if job.pad_s <= 0:
            return
        cancelled = _sleep_until(job.t0 + job.pad_s, job.cancel)
        job.compute_s = time.perf_counter() - job.t0
        if cancelled:
            raise ForwardCancelled("stopped during emulated latency")

    def _make_hook(self, index: int) -> Callable[[nn.Module, Any], None]:
        n = len(self._layers)

        def hook(module: nn.Module, args: Any) -> None:
            job = self._job
            if job is None:
                return
            if job.cancel.is_set():
                raise ForwardCancelled(f"stopped before decoder layer {index}")
            self.counters.layers_run += 1
            if job.pad_s > 0:
                wait = job.t0 + job.pad_s * index / max(n, 1) - time.perf_counter()
                if wait > 0 and job.cancel.wait(wait):
                    raise ForwardCancelled(f"stopped before decoder layer {index}")

        return hook

    def _cut_back(self, session: CachedSession, length: int, aborted: bool = False) -> None:
        """Bring the session's cache back to its first ``length`` tokens. After an aborted forward
        (``aborted``) its layers may hold different numbers of tokens, whatever ``session.tokens``
        says. A cache that cannot be cut back is started over (the next forward recomputes it)."""
        if not aborted and length >= len(session.tokens):
            return
        if crop_kv_cache(session.kv, length):
            del session.tokens[length:]
            session.hashes.truncate(length)
        else:
            self.sessions.reset(session)

    def _model_forward(self, new: list[int], kv: Any, keep: int) -> Any:
        kwargs: dict[str, Any] = {self._cache_kwarg: kv, "use_cache": True}
        if self._supports_logits_to_keep:
            kwargs["logits_to_keep"] = keep
        return self.loaded.model(input_ids=torch.tensor([new], dtype=torch.long, device=self.loaded.device), **kwargs)

    def held_prefix(self, session_id: str, length: int, prefix_hash: int) -> list[int]:
        """The first ``length`` tokens of the session's cache, if it holds them and they hash to
        ``prefix_hash``; else PrefixNotHeld (evicted, restarted, cut back by a cancel, or another
        sequence). Worker thread only, like every session access."""
        session = self.sessions.peek(session_id)
        if session is None or len(session.tokens) < length or session.hashes.at(length) != prefix_hash:
            held = 0 if session is None else len(session.tokens)
            raise PrefixNotHeld(f"session {session_id!r} does not hold the {length}-token prefix (it holds {held})")
        return session.tokens[:length]

    def forward(
        self,
        job: Job,
        session_id: str,
        token_ids: list[int],
        first_logit: int,
        chunking: Chunking | None = None,
        known_prefix: int = 0,
    ) -> tuple[torch.Tensor, int]:
        """Logits predicting positions first_logit + 1 .. len(token_ids), reusing the session cache.

        Returns (logits [len(token_ids) - first_logit, vocab] float32, tokens reused from the cache).
        On return the session cache holds exactly ``token_ids``. With ``chunking`` the sequence is
        computed in fixed-shape chunks (see ``Chunking``) instead of one forward over what is new.
        ``known_prefix``: the cache is known to hold token_ids[:known_prefix] (``held_prefix``), so
        only the rest is compared.
        """
        n = len(token_ids)
        assert 0 <= first_logit < n, (first_logit, n)
        if n > self.max_sequence_length:
            raise ModelError(f"{n} tokens exceed the context of {self.loaded.name} ({self.max_sequence_length})")
        session = self.sessions.get(session_id)
        start = min(common_prefix_len(session.tokens, token_ids, known_prefix), first_logit)
        if chunking is not None:
            start = chunking.start_of(start)
        self._cut_back(session, start)
        if start > len(session.tokens):  # the cache could not keep the prefix (started over)
            start = 0
        if chunking is not None:
            pieces = chunking.pieces(start, n, self.max_sequence_length)
        else:
            pieces = [(start, n, n - first_logit)]
        job.pad_s = self.emulation.pad_s(start == 0, sum(b - a for a, b, _ in pieces))
        job.t0 = time.perf_counter()
        rows: list[torch.Tensor] = []
        try:
            for a, b, keep in pieces:
                real = token_ids[a : min(b, n)]
                padding = b - a - len(real)
                out = self._model_forward(real + [0] * padding, session.kv, keep)
                # The kept rows predict positions b - keep + 1 .. b; this call wants first_logit + 1 .. n.
                lo, hi = max(first_logit, b - keep), min(b, n)
                if lo < hi:
                    kept = out.logits[0, -keep:, :]  # [keep, vocab] (all rows where logits_to_keep is unknown)
                    rows.append(kept[lo - (b - keep) : hi - (b - keep)].float())  # [hi - lo, vocab]
                self.counters.computed_tokens += b - a
                if padding and not crop_kv_cache(session.kv, a + len(real)):
                    self.sessions.reset(session)  # the padding is in a recurrent state: start over next time
                    break
                # Cut back to ``a`` tokens above: the cache now holds token_ids[: a + len(real)].
                del session.tokens[a:]
                session.tokens.extend(real)
                session.hashes.truncate(a)
                session.hashes.append(real)
        except ForwardCancelled:
            self._cut_back(session, len(session.tokens), aborted=True)
            raise
        except torch.OutOfMemoryError as exc:
            self.sessions.drop(session_id)
            raise DeviceOutOfMemory(f"device out of memory on {n} tokens ({n - start} new): {exc}") from exc
        except Exception as exc:
            self.sessions.drop(session_id)
            raise ModelError(
                f"the forward pass of {self.loaded.name} failed on {n} tokens "
                f"({n - start} new): {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            job.compute_s += time.perf_counter() - job.t0
        self.sessions.enforce_budget(keep=session_id)
        self.counters.forwards_completed += 1
        self.counters.cache_hit_tokens += start
        # Tokens computed only to fill the cache up to the first scored position (a prompt's prefill,
        # or a window's catch-up on an instance that lacks part of the sequence).
        self.counters.cache_fill_tokens += max(0, first_logit - start)
        logits = torch.cat(rows) if len(rows) > 1 else rows[0]  # [n - first_logit, vocab]
        assert logits.shape[0] == n - first_logit, (logits.shape, n, first_logit)
        return logits, start
