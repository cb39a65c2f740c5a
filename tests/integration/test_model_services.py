"""Target and drafter services as real processes: Verify correctness with cache reuse, real
cancellation between decoder layers, Draft stream cancellation, bad input."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from dsi.services.model.sampling import Sampling, coupled_choice
from dsi.v1 import common_pb2, drafter_pb2, drafter_pb2_grpc, target_pb2, target_pb2_grpc
from tests.integration.procs import start_service

pytestmark = pytest.mark.integration


def _reference_tokens(model, token_ids: list[int], first: int, sampling: Sampling) -> list[int]:
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0].float()  # [n, vocab]
    rows = logits[first - 1 :]
    return coupled_choice(rows, list(range(first, len(token_ids) + 1)), sampling)


def _info(stub: target_pb2_grpc.TargetServiceStub) -> target_pb2.TargetInfoResponse:
    return stub.Info(target_pb2.TargetInfoRequest(), timeout=10)


def _work(c: common_pb2.ServiceCounters) -> tuple[int, ...]:
    """The counters that move while a model service computes anything."""
    return (c.forwards_completed, c.layers_run, c.cancelled_mid_forward, c.cancelled_queued, c.preempted)


def settled(read: Callable[[], common_pb2.ServiceCounters], quiet_s: float,
            timeout_s: float = 30.0) -> common_pb2.ServiceCounters:
    """The service's counters once it computes nothing: polled until its work counters stayed the
    same for ``quiet_s`` (a few forward passes long). A service that keeps computing never settles,
    and the wait fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last = read()
    since = time.monotonic()
    while True:
        time.sleep(0.05)
        now = read()
        if _work(now) != _work(last):
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return now
        assert time.monotonic() < deadline, f"the service kept computing: {now}"


async def settled_async(read: Callable[[], Awaitable[common_pb2.ServiceCounters]], quiet_s: float,
                        timeout_s: float = 30.0) -> common_pb2.ServiceCounters:
    """``settled`` for an asyncio caller."""
    deadline = time.monotonic() + timeout_s
    last = await read()
    since = time.monotonic()
    while True:
        await asyncio.sleep(0.05)
        now = await read()
        if _work(now) != _work(last):
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return now
        assert time.monotonic() < deadline, f"the service kept computing: {now}"


async def wait_until(read: Callable[[], Awaitable[common_pb2.ServiceCounters]],
                     condition: Callable[[common_pb2.ServiceCounters], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition(await read()):
        assert time.monotonic() < deadline, "timed out waiting for the service's counters"
        await asyncio.sleep(0.01)


def test_verify_matches_full_recompute_with_cache_reuse(tiny_pair: tuple[Path, Path], log_dir: Path) -> None:
    target_dir, _ = tiny_pair
    model = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()
    svc = start_service("target", ["--model", str(target_dir), "--threads", "1"], log_dir)
    try:
        with grpc.insecure_channel(svc.address) as ch:
            stub = target_pb2_grpc.TargetServiceStub(ch)
            g = torch.Generator().manual_seed(0)
            base = torch.randint(1, 300, (40,), generator=g).tolist()
            # Grow, shrink (crop), diverge (crop + recompute), re-grow: all on one session.
            cases = [(base[:10], 10), (base[:20], 15), (base[:12], 9), (base[:8] + [5, 6, 7], 8),
                     (base[:30], 25), (base[:30], 2), (base[:40], 40)]
            for sampling in (Sampling(), Sampling(temperature=0.8, top_k=50, top_p=0.9, seed=42)):
                for ids, first in cases:
                    resp = stub.Verify(target_pb2.VerifyRequest(
                        session_id="s", token_ids=ids, first_position=first,
                        sampling=common_pb2.SamplingParams(temperature=sampling.temperature, top_k=sampling.top_k,
                                                           top_p=sampling.top_p, seed=sampling.seed)), timeout=30)
                    assert list(resp.token_ids) == _reference_tokens(model, ids, first, sampling), (ids, first)
            info = _info(stub)
            assert info.counters.cache_hit_tokens > 0  # the cache was really reused
            assert info.model.vocab_size == model.config.vocab_size
            assert stub.Release(target_pb2.TargetReleaseRequest(session_id="s")).released
            assert not stub.Release(target_pb2.TargetReleaseRequest(session_id="s")).released
    finally:
        svc.stop()


def test_incremental_verify_references_the_held_prefix_by_length_and_hash(
    tiny_pair: tuple[Path, Path], log_dir: Path
) -> None:
    """A window may send only the tokens after a prefix the session holds (prefix_length +
    prefix_hash): same tokens as sending everything. A prefix the session does not hold (longer,
    other tokens, unknown or released session, cut back) is refused with FAILED_PRECONDITION, with no
    forward run and no session created."""
    from dsi.services.runtime.prefixes import PrefixHashes

    target_dir, _ = tiny_pair
    model = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()
    svc = start_service("target", ["--model", str(target_dir), "--threads", "1"], log_dir)
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(1, 300, (60,), generator=g).tolist()

    def verify(stub, session: str, ids: list[int], first: int, k: int = 0, h: int | None = None):  # type: ignore[no-untyped-def]
        return stub.Verify(target_pb2.VerifyRequest(
            session_id=session, token_ids=ids[k:], first_position=first, prefix_length=k,
            prefix_hash=PrefixHashes(ids[:k]).at(k) if h is None else h), timeout=30)

    try:
        with grpc.insecure_channel(svc.address) as ch:
            stub = target_pb2_grpc.TargetServiceStub(ch)
            assert list(verify(stub, "s", seq[:30], 25).token_ids) == _reference_tokens(model, seq[:30], 25, Sampling())
            # Grow by reference: the first 30 tokens are not sent.
            resp = verify(stub, "s", seq[:40], 35, k=30)
            assert list(resp.token_ids) == _reference_tokens(model, seq[:40], 35, Sampling())
            assert resp.cached_tokens == 30
            # A shorter held prefix, then the cache is cut back and diverges: still exact.
            diverged = seq[:20] + [7, 8, 9]
            expected = _reference_tokens(model, diverged, 21, Sampling())
            assert list(verify(stub, "s", diverged, 21, k=20).token_ids) == expected
            forwards = _info(stub).counters.forwards_completed
            refused = [
                lambda: verify(stub, "s", seq[:40], 35, k=30),  # cut back to 23 tokens: 30 no longer held
                lambda: verify(stub, "s", seq[:22], 21, k=21),  # other tokens at position 20
                lambda: verify(stub, "s", diverged, 21, k=21, h=12345),  # wrong hash
                lambda: verify(stub, "unknown", seq[:10], 5, k=5),
            ]
            for call in refused:
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
            info = _info(stub)
            assert info.counters.forwards_completed == forwards and info.counters.sessions == 1
            with pytest.raises(grpc.RpcError) as err:  # a prefix longer than first_position
                verify(stub, "s", diverged, 20, k=21)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        svc.stop()


def test_cancelled_verify_stops_between_layers_and_keeps_cache_consistent(
    deep_pair: tuple[Path, Path], log_dir: Path
) -> None:
    target_dir, _ = deep_pair
    model = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()
    # 12 layers padded to 3 s per forward (250 ms a layer): cancelled once its first layer ran, the
    # call is stopped mid-forward.
    svc = start_service("target", ["--model", str(target_dir), "--threads", "1",
                                   "--emulate-latency-ms", "3000:3000"], log_dir)
    ids = list(range(5, 35))

    async def scenario() -> tuple[int, list[int]]:
        async with grpc.aio.insecure_channel(svc.address) as ch:
            stub = target_pb2_grpc.TargetServiceStub(ch)

            async def counters() -> common_pb2.ServiceCounters:
                return (await stub.Info(target_pb2.TargetInfoRequest(), timeout=10)).counters

            call = stub.Verify(target_pb2.VerifyRequest(session_id="s", token_ids=ids, first_position=20), timeout=30)
            await wait_until(counters, lambda c: c.layers_run >= 1)  # the forward is under way
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await wait_until(counters, lambda c: c.cancelled_mid_forward + c.cancelled_queued >= 1)
            layers_cancelled = (await counters()).layers_run
            # The next call on the same session must be correct (cache cropped back, not corrupted).
            resp = await stub.Verify(target_pb2.VerifyRequest(session_id="s", token_ids=ids, first_position=20),
                                     timeout=30)
            return layers_cancelled, list(resp.token_ids)

    try:
        layers_cancelled, tokens = asyncio.run(scenario())
        assert tokens == _reference_tokens(model, ids, 20, Sampling())
        with grpc.insecure_channel(svc.address) as ch:
            info = _info(target_pb2_grpc.TargetServiceStub(ch))
        c = info.counters
        assert c.calls == 2 and c.cancelled == 1
        assert c.cancelled_mid_forward == 1 and c.cancelled_queued == 0  # stopped between decoder layers
        assert c.forwards_completed == 1  # only the second call's forward completed
        # The aborted forward freed the device at once: it ran fewer than all its layers, and the
        # second call ran its own (the cache cut back, every layer of the window recomputed).
        assert 1 <= layers_cancelled < info.model.num_layers
        assert c.layers_run == layers_cancelled + info.model.num_layers
    finally:
        svc.stop()


def test_cancelled_draft_stream_stops_producing(tiny_pair: tuple[Path, Path], log_dir: Path) -> None:
    _, drafter_dir = tiny_pair
    svc = start_service("drafter", ["--model", str(drafter_dir), "--threads", "1",
                                    "--emulate-latency-ms", "100:100"], log_dir)

    async def scenario() -> int:
        async with grpc.aio.insecure_channel(svc.address) as ch:
            stub = drafter_pb2_grpc.DrafterServiceStub(ch)
            call = stub.Draft(drafter_pb2.DraftRequest(session_id="d", token_ids=[1, 2, 3], max_tokens=200),
                              timeout=60)
            got = 0
            async for msg in call:
                assert msg.position == 3 + got
                got += 1
                if got == 3:
                    break
            call.cancel()  # breaking out of the loop alone would not cancel the stream
            return got

    try:
        assert asyncio.run(scenario()) == 3
        with grpc.insecure_channel(svc.address) as ch:
            stub = drafter_pb2_grpc.DrafterServiceStub(ch)
            # Nothing more is computed: the counters settle (5 forward passes long without a change).
            c = settled(lambda: stub.Info(drafter_pb2.DrafterInfoRequest(), timeout=10).counters, quiet_s=0.5)
        assert c.cancelled == 1
        assert 3 <= c.forwards_completed <= 5  # 3 sent, at most two more computed before the cancel landed
    finally:
        svc.stop()


def test_draft_flow_follows_credit_and_equals_draft(tiny_pair: tuple[Path, Path], log_dir: Path) -> None:
    """DraftFlow sends exactly the credit granted, idles (computing nothing) without credit, resumes
    on a grant, ends after half-close once the credit is used, and gives Draft's tokens."""
    _, drafter_dir = tiny_pair
    svc = start_service("drafter", ["--model", str(drafter_dir), "--threads", "1"], log_dir)
    prefix = [5, 6, 7, 8]

    async def scenario() -> tuple[list[int], list[int], int]:
        async with grpc.aio.insecure_channel(svc.address) as ch:
            stub = drafter_pb2_grpc.DrafterServiceStub(ch)
            reference = [m.token_id async for m in stub.Draft(
                drafter_pb2.DraftRequest(session_id="ref", token_ids=prefix, max_tokens=9), timeout=30)]
            before_flow = (await stub.Info(drafter_pb2.DrafterInfoRequest(), timeout=10)).counters.forwards_completed
            requests: asyncio.Queue[drafter_pb2.DraftFlowRequest | None] = asyncio.Queue()

            async def outgoing():
                while (msg := await requests.get()) is not None:
                    yield msg

            requests.put_nowait(drafter_pb2.DraftFlowRequest(
                start=drafter_pb2.DraftRequest(session_id="flow", token_ids=prefix, max_tokens=3)))
            call = stub.DraftFlow(outgoing(), timeout=30)
            responses = call.__aiter__()
            got = [(await anext(responses)).token_id for _ in range(3)]

            async def counters() -> common_pb2.ServiceCounters:
                return (await stub.Info(drafter_pb2.DrafterInfoRequest(), timeout=10)).counters

            # No credit: the drafter idles (its counters settle) having computed the 3 drafts granted.
            idle = (await settled_async(counters, quiet_s=0.3)).forwards_completed - before_flow
            requests.put_nowait(drafter_pb2.DraftFlowRequest(grant=4))
            requests.put_nowait(drafter_pb2.DraftFlowRequest(grant=2))
            requests.put_nowait(None)  # half-close: the stream ends after the last 6 drafts
            got += [m.token_id async for m in responses]
            assert await call.code() == grpc.StatusCode.OK
            return reference, got, idle

    try:
        reference, got, idle = asyncio.run(scenario())
        assert got == reference  # 3 + 4 + 2 drafts, the same tokens as one Draft call
        assert idle == 3  # one forward per draft granted, none ahead of the credit
    finally:
        svc.stop()


def test_cancelled_draft_flow_stops_producing(tiny_pair: tuple[Path, Path], log_dir: Path) -> None:
    _, drafter_dir = tiny_pair
    svc = start_service("drafter", ["--model", str(drafter_dir), "--threads", "1",
                                    "--emulate-latency-ms", "100:100"], log_dir)

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(svc.address) as ch:
            stub = drafter_pb2_grpc.DrafterServiceStub(ch)

            async def outgoing():
                yield drafter_pb2.DraftFlowRequest(
                    start=drafter_pb2.DraftRequest(session_id="d", token_ids=[1, 2, 3], max_tokens=50))
                await asyncio.sleep(60)

            call = stub.DraftFlow(outgoing(), timeout=60)
            for _ in range(2):
                await call.read()
            call.cancel()

            async def counters() -> common_pb2.ServiceCounters:
                return (await stub.Info(drafter_pb2.DrafterInfoRequest(), timeout=10)).counters

            # Nothing more is computed: the counters settle (5 forward passes long without a change).
            c = await settled_async(counters, quiet_s=0.5)
            assert c.cancelled == 1
            assert 2 <= c.forwards_completed <= 4  # 2 read, at most two more computed before the cancel landed

    try:
        asyncio.run(scenario())
    finally:
        svc.stop()


def test_draft_flow_rejects_bad_grants(tiny_pair: tuple[Path, Path], log_dir: Path) -> None:
    _, drafter_dir = tiny_pair
    svc = start_service("drafter", ["--model", str(drafter_dir), "--threads", "1"], log_dir)
    start = drafter_pb2.DraftFlowRequest(start=drafter_pb2.DraftRequest(session_id="s", token_ids=[1], max_tokens=1))
    cases = [
        ([drafter_pb2.DraftFlowRequest(grant=2)], "start"),  # no start message
        ([start, drafter_pb2.DraftFlowRequest(grant=0)], "grant"),
        ([start, drafter_pb2.DraftFlowRequest(grant=10**6)], "grant"),
        ([start, start], "grant"),  # a second start
        ([start, drafter_pb2.DraftFlowRequest()], "grant"),  # neither start nor grant
        ([drafter_pb2.DraftFlowRequest(start=drafter_pb2.DraftRequest(session_id="s", token_ids=[1], max_tokens=0))],
         "max_tokens"),
    ]
    try:
        with grpc.insecure_channel(svc.address) as ch:
            stub = drafter_pb2_grpc.DrafterServiceStub(ch)
            for messages, field in cases:
                with pytest.raises(grpc.RpcError) as err:
                    list(stub.DraftFlow(iter(messages), timeout=30))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (messages, err.value)
                assert field in err.value.details()
    finally:
        svc.stop()


def test_model_services_reject_bad_input(tiny_pair: tuple[Path, Path], log_dir: Path) -> None:
    target_dir, drafter_dir = tiny_pair
    target = start_service("target", ["--model", str(target_dir), "--threads", "1"], log_dir)
    drafter = start_service("drafter", ["--model", str(drafter_dir), "--threads", "1"], log_dir)
    try:
        with grpc.insecure_channel(target.address) as tch, grpc.insecure_channel(drafter.address) as dch:
            t = target_pb2_grpc.TargetServiceStub(tch)
            d = drafter_pb2_grpc.DrafterServiceStub(dch)
            bad = [
                (lambda: t.Verify(target_pb2.VerifyRequest(session_id="s", token_ids=[1, 99999], first_position=1)),
                 "token_ids"),
                (lambda: t.Verify(target_pb2.VerifyRequest(session_id="s", token_ids=[1, 2], first_position=5)),
                 "first_position"),
                (lambda: t.Verify(target_pb2.VerifyRequest(session_id="", token_ids=[1], first_position=1)),
                 "session_id"),
                (lambda: t.Verify(target_pb2.VerifyRequest(
                    session_id="s", token_ids=[1], first_position=1,
                    sampling=common_pb2.SamplingParams(temperature=-1))), "temperature"),
                (lambda: list(d.Draft(drafter_pb2.DraftRequest(session_id="s", token_ids=[1], max_tokens=0))),
                 "max_tokens"),
                (lambda: list(d.Draft(drafter_pb2.DraftRequest(session_id="s", token_ids=[-1], max_tokens=1))),
                 "token_ids"),
            ]
            for call, field in bad:
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
                assert field in err.value.details()
    finally:
        target.stop()
        drafter.stop()


def test_model_service_serves_prometheus_metrics(tiny_pair: tuple[Path, Path], log_dir: Path) -> None:
    import socket
    import urllib.request

    with socket.socket() as s:  # a port for the metrics listener (the gRPC port is read back as usual)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    svc = start_service("target", ["--model", str(tiny_pair[0]), "--threads", "1", "--metrics-port", str(port)],
                        log_dir)
    try:
        with grpc.insecure_channel(svc.address) as ch:
            stub = target_pb2_grpc.TargetServiceStub(ch)
            stub.Verify(target_pb2.VerifyRequest(session_id="m", token_ids=[1, 2, 3], first_position=2), timeout=30)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        assert 'dsi_model_calls_total{role="target"} 1.0' in text
        assert 'dsi_model_forwards_total{role="target"} 1.0' in text
        assert 'dsi_model_sessions{role="target"} 1.0' in text
    finally:
        svc.stop()
